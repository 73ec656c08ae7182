//! The Huawei Ascend backend: `dsv4_core::Backend` over AscendCL / aclnn, through the
//! run-time-resolved FFI of `dsv4-ascend-sys`.
//!
//! * Activations are f32 and indices i32 in device memory from a caching pool over
//!   `aclrtMalloc`; tensors are immutable and contiguous, so `reshape` and axis-0 `narrow`
//!   share memory (an element offset in the `aclTensor` view) and every other op writes a new
//!   block. Strided `aclTensor` views make transposes, slices and broadcasts free inputs.
//! * Pools of the paged decoding state are the mutable exception: one block each (F32 or
//!   BF16 rows), zeroed once and written in place with aclnnInplaceIndexCopy (`pool`).
//! * One stream; uploads go through pinned staging buffers with `aclrtMemcpyAsync`, so they
//!   stay ordered with queued kernels; downloads synchronise first.
//! * Every operator goes through one helper (`acl::Device::call`): GetWorkspaceSize →
//!   workspace from the pool → launch, with `aclGetRecentErrMsg` in every error.
//! * Weights (`dsv4_core::weight_forms::checkpoint_form` decides): F32 / BF16 / F16 are kept
//!   as stored. On the Ascend 950, FP8 e4m3 with E8M0 block scales and MXFP4 (FP4 e2m1, one
//!   E8M0 per 32) stay as stored (FLOAT8_E4M3FN / FLOAT4_E2M1 codes and their FLOAT8_E8M0
//!   scales: 1 and 0.53 bytes per value). Elsewhere, and for scales those forms cannot hold,
//!   FP4 with E8M0 scales is kept as INT8 `2·e2m1` with a BF16 scale per group (exact); other
//!   FP8 / FP4 are dequantised at upload with `dsv4_core::quant` and kept as BF16 when that is
//!   exact (for E8M0-scaled FP8 whenever the scale bytes are in 3..=246), F32 otherwise. For
//!   an f32 GEMM a non-F32 weight is widened into a pooled F32 temporary per call (in blocks of
//!   rows beyond 256 MiB; quantised forms by aclnnCast of the codes and aclnnMul by their
//!   scales), so results equal the CPU reference (f32 accumulation, `cubeMathType`
//!   KEEP_DTYPE). In bf16 the routed experts and the projections at a rounding point
//!   (`linear_act`) multiply BF16 and quantised weights without an F32 copy: INT8-group and
//!   MXFP4 projections as kept (aclnnWeightQuantBatchMatmulV2), the rest dequantised into a
//!   BF16 temporary.
//!
//! Fused V4 operations: Huawei's kernels replace the trait's compositions where the SoC, the
//! loaded op libraries and `DSV4_ASCEND_FUSED` allow ([`kernels`]); `dsv4 devices` lists each
//! decision. Per SoC (from the CANN operator docs):
//!
//! | dsv4 fused op | aclnn kernel | Atlas A2 (910B) | Atlas A3 (910C) | Ascend 950 | dsv4 uses it |
//! |---|---|---|---|---|---|
//! | `moe_experts` | `aclnnGroupedMatmulV4` (FLOAT32, one 3-D weight, groups along M; in bf16 BF16 with a weight list) | yes | yes | yes | **yes** where supported; else per-expert IndexSelect, Matmul, IndexAdd |
//! | `linear_act`, `grouped_linear_act` in bf16 / official (projections at a rounding point) | `aclnnMatmul`, `aclnnBatchMatMul` on BF16 operands (not a fused kernel; in the table for its switch and self-test) | yes | yes | yes | **yes**: x holding BF16 values, BF16 / quantised weight; else Matmul in f32, then Cast to BF16 and back |
//! | `linear_act` in bf16 / official on an INT8-group or MXFP4 weight | `aclnnWeightQuantBatchMatmulV2` (per-group INT8; MX mode FP4 + E8M0 on the 950) | yes | yes | yes | **yes**: the weight as kept, no BF16 copy; else the BF16 Matmul above on a dequantised copy |
//! | `moe_route` (sigmoid / softmax scores) | `aclnnMoeGatingTopKV2` (top-k + bias, hash routing) | yes | yes | yes | **yes** where supported |
//! | `moe_route` (V4 sqrt-softplus scores) | `aclnnMoeGatingTopKV2` normType 2 | no | no | yes | **yes** on 950; else Softplus, Sqrt, Add, Topk, Gather, ReduceSum, Div |
//! | `sparse_attention` | `aclnnSparseFlashMla` (+ `…Metadata`; "SWA sparse ori_kv": D = 512, BF16/FP16) | yes | yes | yes | opt-in (`DSV4_ASCEND_FUSED=all`): in bf16/official with a BF16 pool (padded to a block multiple, `pool.rs`; `attention.rs`); else IndexSelect, Matmul, Softmax, Matmul |
//! | `indexer_select` | `aclnnLightningIndexerV2` (D = 128, BF16/FP16 q/k) | yes | yes | yes | opt-in (`DSV4_ASCEND_FUSED=all`): in bf16 with a BF16 pool (`indexer.rs`); else Matmul, Relu, ReduceSum, Topk |
//! | `compressor_step` | `aclnnCompressor` (H 1024..=10240, C4A / C4Li / C128A, BF16 x and weights) | no (`aclnnCompressor.md`) | yes | yes | opt-in (`DSV4_ASCEND_FUSED=all`): in bf16/official at V4's widths, through a per-step scratch state (`compressor.rs`); else Matmul, IndexSelect, Add, Softmax, Mul, ReduceSum |
//! | `hc_pre` / `hc_post` / `hc_head` (mHC) | custom ops only (cann-recipes `npu_hc_pre/post`) | – | – | – | no: default composition |
//! | `swiglu` | `aclnnSwiGlu` (no clamp) | yes | yes | yes | no: the V4 clamp needs Clamp + Silu + Mul |
//!
//! The attention kernels take BF16/FP16 activations only, so they serve `--precision bf16` /
//! `official`; in f32 every backend matches the f32/f64 reference within 1e-4 through the
//! compositions. The MoE kernels run in FLOAT32 and keep that accuracy, except the routed
//! experts in bf16, which run in BF16 on the stored weights (`moe.rs`), as do the projections
//! at a rounding point (`linear_act`).
//!
//! The 950's native FP8 / MXFP4 forms are checked at open against the host's dequantisation
//! (`kernels::NATIVE_LOW_BIT_WEIGHTS`: no doc states FLOAT4_E2M1's nibble order) and read by aclnnCast (widening, `aclnnCast.md`'s 950
//! conversion table) and, for MXFP4 in bf16, by aclnnWeightQuantBatchMatmulV2's MX mode. Not
//! used: its A16W8 FP8 form (per-channel scales only, so not V4's 128×128 blocks), the W8A8 /
//! MX-quantised forms of `aclnnQuantMatmulV5` and the grouped matmul (they take FP8
//! activations), and F32-scaled FP8 natively (dequantised, as on A2/A3). BF16 is unavailable
//! on 310P/910A: F16 weights work there, BF16 ones are rejected by the operators with their
//! own error text.

mod acl;
mod executors;

use std::sync::Arc;

use acl::{err, esize, AclIntArray, AclScalar, AclTensor, AclTensorList, Buffer, Device};
use dsv4_ascend_sys as sys;
use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_core::backend::{
    composed, Backend, BinaryOp, DeviceTensor, ExpertWeights, Precision, ReduceOp, RowFormat, UnaryOp,
};
use dsv4_core::backend_checks::{self as checks, IndexBounds};
use dsv4_core::config::ScoringFunc;
use dsv4_core::error::{Error, Result};
use dsv4_core::tensor::{DType, StoredWeight, WeightFormat};
use dsv4_core::weight_forms::{checkpoint_form, DeviceForm, SocFamily as WeightSoc};

/// What `dsv4 devices` prints for Ascend.
pub fn probe() -> std::result::Result<String, String> {
    match sys::Api::load() {
        Ok(api) => {
            let what = if api.is_emulator() { "emulator" } else { "runtime" };
            let libs: Vec<String> = api.library_paths().iter().map(|p| p.display().to_string()).collect();
            Ok(format!("{what} found: {}", libs.join(", ")))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// On dsv4's CPU emulator, how many times the aclnn operator `op` (e.g. `aclnnGroupedMatmulV4`)
/// has been launched in this process; None on a real runtime or when nothing is loaded.
pub fn emulator_launches(op: &str) -> Option<u64> {
    emulator_count(op, |api| api.dsv4emu_launch_count().ok())
}

/// On dsv4's CPU emulator, how many times `op`'s GetWorkspaceSize (the host-side planning) has
/// run in this process; None on a real runtime.
pub fn emulator_plans(op: &str) -> Option<u64> {
    emulator_count(op, |api| api.dsv4emu_plan_count().ok())
}

/// One of the emulator's per-operator counters (`dsv4emu_*_count`).
fn emulator_count(op: &str, counter: impl Fn(&sys::Api) -> Option<sys::pfn::dsv4emu_launch_count>) -> Option<u64> {
    let api = sys::runtime().ok()?;
    let f = counter(api)?;
    let name = std::ffi::CString::new(op).ok()?;
    // SAFETY: a NUL-terminated string that outlives the call; the emulator only reads it.
    Some(unsafe { f(name.as_ptr()) })
}

/// Opens device `device` (an index into the devices the runtime exposes, after
/// `ASCEND_RT_VISIBLE_DEVICES`), with fused kernels as `DSV4_ASCEND_FUSED` says.
pub fn open(device: usize) -> Result<AscendBackend> {
    open_with(device, FusedPolicy::from_env()?)
}

/// [`open`] with an explicit fused-kernel policy.
pub fn open_with(device: usize, policy: FusedPolicy) -> Result<AscendBackend> {
    let api = sys::runtime().map_err(|e| err(e.to_string()))?;
    let id = i32::try_from(device).map_err(|_| err(format!("device {device} is out of range")))?;
    let dev = Device::open(api, id)?;
    let soc = acl::soc_name(api);
    let kernels = kernels::Kernels::select(api, &soc, policy);
    let be = AscendBackend {
        dev,
        soc,
        kernels,
        gmm_stack_bytes: moe::DEFAULT_STACK_BYTES,
        linear_widen_bytes: DEFAULT_LINEAR_WIDEN_BYTES,
    };
    be.self_test_fused()?;
    be.self_test_native_weights()?;
    be.self_test_weight_quant_matmul()?;
    be.self_test_linear_bf16()?;
    be.self_test_attention()?;
    be.self_test_indexer()?;
    be.self_test_compressor()?;
    Ok(be)
}

/// The Ascend backend (one device, one stream).
pub struct AscendBackend {
    dev: Arc<Device>,
    soc: String,
    kernels: kernels::Kernels,
    /// Largest widened expert stack one grouped matmul reads (see `moe`).
    gmm_stack_bytes: usize,
    /// Largest F32 copy of a weight `linear` makes at once (see `linear`).
    linear_widen_bytes: usize,
}

/// The default of [`AscendBackend::set_linear_widen_budget`]: 256 MiB.
const DEFAULT_LINEAR_WIDEN_BYTES: usize = 256 << 20;

/// An f32 activation in device memory: `shape` elements from element `offset` of `buf`.
#[derive(Clone)]
pub struct AscendTensor {
    buf: Arc<Buffer>,
    shape: Vec<usize>,
    offset: usize,
    /// Every value is a BF16 value (the output of `round_to_bf16` or of a BF16 `linear_act`, an
    /// upload of such values, and views of those), so a cast to BF16 is exact (up to a NaN's
    /// payload): `linear_act` may then feed it to a BF16 matmul. False when not known.
    bf16: bool,
}

impl DeviceTensor for AscendTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// An i32 index tensor in device memory (`-1` = no entry).
#[derive(Clone)]
pub struct AscendIndex {
    buf: Arc<Buffer>,
    shape: Vec<usize>,
    offset: usize,
    /// The values, when they are known on the host (`upload_index`, and `offset_index` /
    /// `concat_index` of such indices): indices are immutable, so the range checks of
    /// `dsv4_core::backend_checks` and `pool_write`'s slot checks use them without a download.
    host: Option<Arc<[i32]>>,
}

impl AscendIndex {
    /// The smallest and largest value, when the values are known on the host.
    fn bounds(&self) -> Option<IndexBounds> {
        self.host.as_deref().and_then(IndexBounds::of)
    }
}

impl DeviceTensor for AscendIndex {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// A weight in device memory: its logical shape and the form it is kept in
/// (`dsv4_core::weight_forms`).
pub struct AscendWeight {
    buf: Buffer,
    shape: Vec<usize>,
    /// The element type of `buf`: `ACL_FLOAT`, `ACL_BF16` or `ACL_FLOAT16` values, or the codes
    /// of a quantised form (`ACL_INT8`, `ACL_FLOAT4_E2M1`, `ACL_FLOAT8_E4M3FN`; see `scales`).
    dtype: Dt,
    rows: usize,
    cols: usize,
    /// The scales of a quantised form; None for float weights.
    scales: Option<Scales>,
}

/// The scales of a weight kept quantised: the value of code `[r, c]` is `code · scale`, with
/// the scale of row `r`'s group of `group` columns holding `c`
/// ([`ScaleLayout::rows_per_scale`] rows share one scale row).
struct Scales {
    buf: Buffer,
    layout: ScaleLayout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScaleLayout {
    /// The FP4 experts' exact Atlas A2/A3 form: INT8 `2·e2m1` codes, one BF16 scale
    /// `2^(b−128)` per `group` values of a row, `[rows, cols / group]`.
    Int8Groups { group: usize },
    /// MXFP4 as stored (Ascend 950): e2m1 codes two per byte, the first in the low nibble, and
    /// one E8M0 byte `2^(b−127)` per 32 values of a row, `[rows, cols / 32]`.
    Mx,
    /// FP8 e4m3 as stored (Ascend 950): one E8M0 byte per `rows × cols` block,
    /// `[⌈rows / block_rows⌉, cols / block_cols]`.
    Fp8Blocks { rows: usize, cols: usize },
}

impl ScaleLayout {
    /// Columns that share one scale.
    fn group(self) -> usize {
        match self {
            ScaleLayout::Int8Groups { group } => group,
            ScaleLayout::Mx => 32,
            ScaleLayout::Fp8Blocks { cols, .. } => cols,
        }
    }

    /// Weight rows that share one row of scales.
    fn rows_per_scale(self) -> usize {
        match self {
            ScaleLayout::Fp8Blocks { rows, .. } => rows,
            _ => 1,
        }
    }

    /// The dtype of the stored scales.
    fn dtype(self) -> Dt {
        match self {
            ScaleLayout::Int8Groups { .. } => Dt::ACL_BF16,
            ScaleLayout::Mx | ScaleLayout::Fp8Blocks { .. } => Dt::ACL_FLOAT8_E8M0,
        }
    }
}

impl AscendWeight {
    /// `ACL_FLOAT`, `ACL_BF16`, `ACL_FLOAT16`, or the codes of a quantised form: `ACL_INT8`
    /// (BF16 group scales), `ACL_FLOAT4_E2M1` (MXFP4) or `ACL_FLOAT8_E4M3FN` (E8M0 blocks).
    pub fn dtype(&self) -> Dt {
        self.dtype
    }

    /// Device bytes the weight takes, scales included.
    pub fn device_bytes(&self) -> usize {
        let scales = self.scales.as_ref().map_or(0, |s| {
            let scale_rows = self.rows.div_ceil(s.layout.rows_per_scale());
            scale_rows * (self.cols / s.layout.group()) * esize(s.layout.dtype())
        });
        acl::bytes_for(self.rows * self.cols, self.dtype) + scales
    }
}

/// A device block viewed as row-major data of some dtype, for building `aclTensor`s.
#[derive(Clone, Copy)]
struct Mem<'a> {
    buf: &'a Buffer,
    offset: usize,
    dtype: Dt,
}

impl<'a> Mem<'a> {
    /// The whole block `buf` as BF16 values.
    fn bf16(buf: &'a Buffer) -> Mem<'a> {
        Mem { buf, offset: 0, dtype: Dt::ACL_BF16 }
    }
}

macro_rules! aclnn {
    ($be:expr, $op:ident / $ws:ident ( $($arg:expr),* $(,)? )) => {{
        let api = $be.api();
        $be.dev.call(stringify!($op), api.$op(), |ws, ex| {
            let f = api.$ws()?;
            // SAFETY: every argument is a live ACL object (owned by the caller's scope, which
            // outlives the launch) or a plain value; `ws`/`ex` are `call`'s out-pointers.
            Ok(unsafe { f($($arg,)* ws, ex) })
        })
    }};
}

pub mod kernels;

pub use hccl::{
    physical_devices, physical_ids, run_bootstrapped, run_node_ranks, run_ranks, visible_devices, HcclBootstrap,
    HcclCommunicator,
};
pub use kernels::{Choice, FusedPolicy, FUSED_VAR};
pub use pool::AscendPool;

/// An operator through the executor cache (`executors`): `[inputs] => [outputs]` are the
/// operator's tensor parameters (one `AclTensor` each, moved in), `scalars [..]` its
/// `AclScalar`s (moved in), `attrs [..]` the values of its other arguments, and the argument
/// list refers to them as `i[n]` / `o[n]` / `s[n]`.
macro_rules! aclnn_cached {
    ($be:expr, $op:ident / $ws:ident, [$($inp:expr),*] => [$($out:expr),*], attrs [$($a:expr),*],
     |$i:ident, $o:ident| ( $($arg:expr),* $(,)? )) => {
        aclnn_cached!($be, $op / $ws, [$($inp),*] => [$($out),*], scalars [], attrs [$($a),*],
            |$i, $o, _s| ($($arg),*))
    };
    ($be:expr, $op:ident / $ws:ident, [$($inp:expr),*] => [$($out:expr),*], scalars [$($sc:expr),*],
     attrs [$($a:expr),*], |$i:ident, $o:ident, $s:ident| ( $($arg:expr),* $(,)? )) => {{
        let api = $be.api();
        $be.dev.call_cached(
            stringify!($op),
            api.$op(),
            vec![$($inp),*],
            vec![$($out),*],
            vec![$($sc),*],
            &[$($a as i64),*],
            Box::new(|$i: &[acl::AclTensor], $o: &[acl::AclTensor], $s: &[acl::AclScalar], ws, ex| {
                let f = api.$ws()?;
                // SAFETY: every tensor is owned by the call (or the cache) and outlives the
                // launch; the other arguments are plain values; `ws`/`ex` are out-pointers.
                Ok(unsafe { f($($arg,)* ws, ex) })
            }),
        )
    }};
}

mod attention;
mod compressor;
pub mod hccl;
mod indexer;
mod moe;
mod moe_distribute;
mod pool;

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

fn numel(dims: &[usize]) -> usize {
    dims.iter().product()
}

impl AscendBackend {
    fn api(&self) -> &'static sys::Api {
        self.dev.api
    }

    /// The SoC family `dsv4_core::weight_forms::checkpoint_form` decides the weight forms for:
    /// the 950 keeps FP8 and MXFP4 natively (`../shared/spec/ascend-api.md` §2.6) unless that is
    /// switched off ([`kernels::NATIVE_LOW_BIT_WEIGHTS`]); Atlas A2, A3 and the rest take the
    /// exact A2/A3 forms. What `dsv4 serve` plans the device's weight bytes with.
    pub fn weight_soc(&self) -> WeightSoc {
        match kernels::SocFamily::of(&self.soc) {
            kernels::SocFamily::Ascend950 if self.kernels.native_weights.usable() => WeightSoc::A5,
            kernels::SocFamily::AtlasA2 => WeightSoc::A2,
            _ => WeightSoc::A3,
        }
    }

    /// The SoC the runtime reports (`aclrtGetSocName`).
    pub fn soc(&self) -> &str {
        &self.soc
    }

    /// Why this device cannot run a V4 model at all (`None` when it can): the Atlas inference
    /// series (310P) and the first training series (910A) lack `aclnnInplaceIndexCopy`, which
    /// every KV pool write needs (the CANN docs list it as unsupported there). `dsv4 devices`
    /// shows such a device as unusable with this reason, `--backend ascend` is refused with it
    /// before any weights load, and `--backend auto` runs on the CPU instead.
    pub fn unable_to_run_v4(&self) -> Option<String> {
        use kernels::SocFamily;
        matches!(SocFamily::of(&self.soc), SocFamily::Atlas310P | SocFamily::Atlas910A).then(|| {
            format!("KV pools need aclnnInplaceIndexCopy, which the CANN docs list as unsupported on {}", self.soc)
        })
    }

    /// Which Huawei fused kernels this backend uses, and why the others are not used.
    pub fn fused_kernels(&self) -> Vec<Choice> {
        self.kernels.choices()
    }

    /// A failed aclnnSoftplus, explained where the CANN docs list none (the 950): V4's
    /// sqrt-softplus routing runs there on the fused gating kernel, so the composition only
    /// runs when that kernel is off or declines the call.
    fn softplus_missing(&self, e: Error) -> Error {
        if kernels::SocFamily::of(&self.soc) != kernels::SocFamily::Ascend950 {
            return e;
        }
        let gating = self.kernels.choices().into_iter().find(|c| c.name.contains("sqrt-softplus"));
        let state = match gating {
            Some(c) if c.used => {
                "in use, but it declined this call (more than 2048 experts, or a k it does not take)".into()
            }
            Some(c) => format!("not in use here: {}", c.why),
            None => "unknown".into(),
        };
        err(format!(
            "{e}; the CANN docs list no aclnnSoftplus on {}, where V4's sqrt-softplus routing runs on the fused \
             aclnnMoeGatingTopKV2 (normType 2), which is {state}",
            self.soc
        ))
    }

    /// Switches off, for this backend's lifetime, every fused kernel whose `dsv4 devices` name
    /// contains `which` (e.g. `aclnnSparseFlashMla`), so that its composition runs: to compare
    /// one kernel against the composition or bisect a suspected kernel problem. Returns how many
    /// kernels matched.
    pub fn switch_off_fused(&self, which: &str) -> usize {
        self.kernels.switch_off(which)
    }

    /// (hits, misses) of the reusable-executor cache since the device was opened; None when
    /// the cache is off (`DSV4_ASCEND_EXECUTOR_CACHE=off`, or a runtime without the API).
    pub fn executor_cache_stats(&self) -> Option<(u64, u64)> {
        self.dev.executor_stats()
    }

    /// Caps the temporary each grouped matmul widens expert weights into (default 256 MiB): the
    /// F32 stack in f32, the BF16 copies of quantised experts in bf16; experts beyond it go to
    /// further grouped matmuls. At least one expert per launch.
    pub fn set_grouped_matmul_budget(&mut self, bytes: usize) {
        self.gmm_stack_bytes = bytes;
    }

    /// Caps the F32 copy `linear` makes of a BF16/F16/quantised weight for its f32 matmul
    /// (default 256 MiB; a quantised weight counts 8 bytes a value, its codes' F32 copy
    /// included): a
    /// larger weight is widened and multiplied a block of rows at a time (the same values up to
    /// the summation order). At least one row per block.
    pub fn set_linear_widen_budget(&mut self, bytes: usize) {
        self.linear_widen_bytes = bytes;
    }

    /// Device memory currently held by the pool (in use or cached).
    pub fn held_bytes(&self) -> usize {
        self.dev.held_bytes()
    }

    /// Drops the cached executors and returns cached device memory to the runtime.
    pub fn trim(&self) -> Result<()> {
        // Device::trim drains the stream first, so no queued launch still uses an executor.
        self.dev.trim()?;
        self.dev.executors.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    fn alloc(&self, elems: usize, dtype: Dt) -> Result<Buffer> {
        self.dev.alloc(acl::bytes_for(elems, dtype).max(1))
    }

    fn new_tensor(&self, shape: &[usize]) -> Result<AscendTensor> {
        Ok(AscendTensor {
            buf: Arc::new(self.alloc(numel(shape), Dt::ACL_FLOAT)?),
            shape: shape.to_vec(),
            offset: 0,
            bf16: false,
        })
    }

    fn new_index(&self, shape: &[usize]) -> Result<AscendIndex> {
        Ok(AscendIndex {
            buf: Arc::new(self.alloc(numel(shape), Dt::ACL_INT32)?),
            shape: shape.to_vec(),
            offset: 0,
            host: None,
        })
    }

    /// An `aclTensor` over `m` with explicit element strides (relative to `m.offset`).
    fn view(&self, m: Mem<'_>, dims: &[usize], st: &[usize], extra_offset: usize) -> Result<AclTensor> {
        AclTensor::new(self.api(), m.buf, m.dtype, dims, st, m.offset + extra_offset)
    }

    /// A contiguous `aclTensor` over `m` with the given dims.
    fn cview(&self, m: Mem<'_>, dims: &[usize]) -> Result<AclTensor> {
        self.view(m, dims, &strides(dims), 0)
    }

    fn tmem<'a>(&self, t: &'a AscendTensor) -> Mem<'a> {
        Mem { buf: &t.buf, offset: t.offset, dtype: Dt::ACL_FLOAT }
    }

    fn imem<'a>(&self, t: &'a AscendIndex) -> Mem<'a> {
        Mem { buf: &t.buf, offset: t.offset, dtype: Dt::ACL_INT32 }
    }

    fn tv(&self, t: &AscendTensor) -> Result<AclTensor> {
        self.cview(self.tmem(t), &t.shape)
    }

    fn iv(&self, t: &AscendIndex) -> Result<AclTensor> {
        self.cview(self.imem(t), &t.shape)
    }

    fn f32s(&self, v: f32) -> Result<AclScalar> {
        AclScalar::f32(self.api(), v)
    }

    /// `dst ← src` (strided src allowed, dtype converted): aclnnInplaceCopy.
    fn copy(&self, dst: &AclTensor, src: &AclTensor) -> Result<()> {
        aclnn!(self, aclnnInplaceCopy / aclnnInplaceCopyGetWorkspaceSize(dst.ptr(), src.ptr()))
    }

    fn fill(&self, dst: &AclTensor, value: &AclScalar) -> Result<()> {
        aclnn!(self, aclnnInplaceFillScalar / aclnnInplaceFillScalarGetWorkspaceSize(dst.ptr(), value.ptr()))
    }

    /// Materialises a strided view of `x` into a new contiguous tensor of shape `dims`.
    fn gather_view(&self, x: &AscendTensor, dims: &[usize], st: &[usize], offset: usize) -> Result<AscendTensor> {
        let out = self.new_tensor(dims)?;
        if numel(dims) > 0 {
            self.copy(&self.tv(&out)?, &self.view(self.tmem(x), dims, st, offset)?)?;
        }
        Ok(out)
    }

    /// A weight as an F32 `aclTensor` of shape `[rows, cols]`, widening into a pooled
    /// temporary when it is kept in a narrower type. Returns the temporary to keep alive.
    fn weight_f32(&self, w: &AscendWeight) -> Result<(Option<Buffer>, AclTensor)> {
        let dims = [w.rows, w.cols];
        if w.dtype == Dt::ACL_FLOAT {
            return Ok((None, self.cview(Mem { buf: &w.buf, offset: 0, dtype: w.dtype }, &dims)?));
        }
        let tmp = self.alloc(w.rows * w.cols, Dt::ACL_FLOAT)?;
        self.widen_weight_into(w, Mem { buf: &tmp, offset: 0, dtype: Dt::ACL_FLOAT })?;
        let t = self.cview(Mem { buf: &tmp, offset: 0, dtype: Dt::ACL_FLOAT }, &dims)?;
        Ok((Some(tmp), t))
    }

    /// A weight holding BF16 values ([`moe::holds_bf16`]) as the BF16 matmuls read it: None
    /// when it is stored BF16 (read as is), else its quantised form (INT8 groups, MXFP4, FP8
    /// blocks) dequantised exactly into a BF16 temporary (keep it alive until the launch is
    /// queued).
    fn bf16_weight(&self, w: &AscendWeight) -> Result<Option<Buffer>> {
        match (&w.scales, w.dtype) {
            (None, Dt::ACL_BF16) => Ok(None),
            (Some(_), _) => {
                let tmp = self.alloc(w.rows * w.cols, Dt::ACL_BF16)?;
                self.widen_weight_into(w, Mem::bf16(&tmp))?;
                Ok(Some(tmp))
            }
            _ => Err(err(format!("a {:?} weight does not hold BF16 values", w.dtype))),
        }
    }

    /// Whether `linear_act` / `grouped_linear_act` take the BF16 matmul: `act` rounds to BF16,
    /// x holds BF16 values, the weight too, and the switch is on.
    fn bf16_matmul_applies(&self, x: &AscendTensor, w: &AscendWeight, act: Precision) -> bool {
        act.rounds_to_bf16() && x.bf16 && self.kernels.linear_bf16.usable() && moe::holds_bf16(w)
    }

    /// [`Backend::linear_act`] in bf16 as one BF16 matmul: x (BF16 values, so the cast is
    /// exact) times W as stored (a quantised weight through aclnnWeightQuantBatchMatmulV2 where
    /// it takes it, else dequantised exactly into a BF16
    /// temporary), aclnnMatmul with KEEP_DTYPE rounding each f32-accumulated sum to BF16 once,
    /// cast back to f32. W is never widened to F32. Callers check `x.bf16` and
    /// [`moe::holds_bf16`].
    fn linear_bf16(&self, x: &AscendTensor, w: &AscendWeight) -> Result<AscendTensor> {
        let shape = checks::linear(self.name(), &x.shape, &w.shape)?;
        let k = w.cols;
        let m = numel(&x.shape) / k.max(1);
        if numel(&shape) == 0 || k == 0 {
            return Ok(AscendTensor { bf16: true, ..self.full(&shape, 0.0)? });
        }
        if self.kernels.weight_quant_matmul.usable() && self.weight_quant_applies(w, m) {
            if let Some(y) = self.fused(&self.kernels.weight_quant_matmul, || self.linear_weight_quant(x, w))? {
                return Ok(y);
            }
        }
        self.linear_bf16_dequantised(x, w, m)
    }

    /// [`Self::linear_bf16`] as one BF16 aclnnMatmul, on a BF16 weight as stored or on a
    /// quantised one dequantised into a BF16 temporary.
    fn linear_bf16_dequantised(&self, x: &AscendTensor, w: &AscendWeight, m: usize) -> Result<AscendTensor> {
        let shape = checks::linear(self.name(), &x.shape, &w.shape)?;
        let (k, n) = (w.cols, w.rows);
        let xb = self.cast_to(x, Dt::ACL_BF16)?;
        let dequantised = self.bf16_weight(w)?;
        // W [N, K] read as its transpose [K, N] through strides: no copy.
        let w_t = self.view(Mem::bf16(dequantised.as_ref().unwrap_or(&w.buf)), &[k, n], &[1, k], 0)?;
        let ob = self.alloc(m * n, Dt::ACL_BF16)?;
        let (a, o) = (self.cview(Mem::bf16(&xb), &[m, k])?, self.cview(Mem::bf16(&ob), &[m, n])?);
        aclnn_cached!(self, aclnnMatmul / aclnnMatmulGetWorkspaceSize, [a, w_t] => [o], attrs [sys::ACL_CUBE_KEEP_DTYPE],
            |i, o| (i[0].ptr(), i[1].ptr(), o[0].ptr(), sys::ACL_CUBE_KEEP_DTYPE))?;
        let out = self.new_tensor(&shape)?;
        self.cast_into(self.cview(Mem::bf16(&ob), &shape)?, self.tv(&out)?, Dt::ACL_FLOAT)?;
        Ok(AscendTensor { bf16: true, ..out })
    }

    /// Whether aclnnWeightQuantBatchMatmulV2 takes `w` as kept, for `m` input rows: the INT8
    /// form with a group in [32, K−1] that is a multiple of 32 (per-group), or MXFP4 (MX mode,
    /// 950 only, where it is kept) with an even N; K and N within [1, 65535] on Atlas A2/A3.
    fn weight_quant_applies(&self, w: &AscendWeight, m: usize) -> bool {
        let Some(sc) = &w.scales else { return false };
        let (k, n) = (w.cols, w.rows);
        let form = match sc.layout {
            ScaleLayout::Int8Groups { group } => group % 32 == 0 && group < k,
            // "若weight数据类型为FLOAT4_E2M1，则weight的最后一维应为2对齐": n of (k, n).
            ScaleLayout::Mx => n % 2 == 0,
            ScaleLayout::Fp8Blocks { .. } => false,
        };
        let limit =
            if kernels::SocFamily::of(&self.soc) == kernels::SocFamily::Ascend950 { i32::MAX as usize } else { 65535 };
        form && m > 0 && (1..=limit).contains(&k) && (1..=limit).contains(&n)
    }

    /// [`Backend::linear_act`] in bf16 on a weight kept with group scales, multiplied as kept:
    /// aclnnWeightQuantBatchMatmulV2 with x BF16 `[m, K]` (its values are BF16 values, so the
    /// cast is exact), the weight `[N, K]` read as its transpose `[K, N]` and its scales
    /// `[N, K/g]` as `[K/g, N]` (the doc allows a transposed weight, with scales transposed
    /// alike), y BF16 (f32 accumulation, one rounding), cast back to f32. The INT8 form runs
    /// per-group with its BF16 scales; MXFP4 in MX mode with its E8M0 scales (group 32).
    /// Callers check [`Self::weight_quant_applies`].
    fn linear_weight_quant(&self, x: &AscendTensor, w: &AscendWeight) -> Result<AscendTensor> {
        let shape = checks::linear(self.name(), &x.shape, &w.shape)?;
        let sc = w.scales.as_ref().ok_or_else(|| err("aclnnWeightQuantBatchMatmulV2 needs a scaled weight"))?;
        let (k, n, g) = (w.cols, w.rows, sc.layout.group());
        let m = numel(&x.shape) / k;
        let xb = self.cast_to(x, Dt::ACL_BF16)?;
        let a = self.cview(Mem::bf16(&xb), &[m, k])?;
        let wv = self.view(Mem { buf: &w.buf, offset: 0, dtype: w.dtype }, &[k, n], &[1, k], 0)?;
        let sv = self.view(Mem { buf: &sc.buf, offset: 0, dtype: sc.layout.dtype() }, &[k / g, n], &[1, k / g], 0)?;
        let ob = self.alloc(m * n, Dt::ACL_BF16)?;
        let o = self.cview(Mem::bf16(&ob), &[m, n])?;
        let null = std::ptr::null_mut();
        aclnn!(
            self,
            aclnnWeightQuantBatchMatmulV2
                / aclnnWeightQuantBatchMatmulV2GetWorkspaceSize(
                    a.ptr(),
                    wv.ptr(),
                    sv.ptr(),
                    null, // antiquantOffsetOptional: symmetric codes
                    null, // quantScaleOptional / quantOffsetOptional: reserved
                    null,
                    null, // biasOptional
                    g as std::os::raw::c_int,
                    o.ptr()
                )
        )?;
        let out = self.new_tensor(&shape)?;
        self.cast_into(self.cview(Mem::bf16(&ob), &shape)?, self.tv(&out)?, Dt::ACL_FLOAT)?;
        Ok(AscendTensor { bf16: true, ..out })
    }

    /// [`Backend::grouped_linear_act`] in bf16 as one BF16 aclnnBatchMatMul, as
    /// [`Self::linear_bf16`] does for `linear`: x `[M, G, K]` cast to BF16 (exact) and read as
    /// `[G, M, K]`, W `[G·R, K]` as stored (quantised: dequantised into BF16) read as `[G, K, R]`,
    /// out `[G, M, R]` in BF16, copied back (aclnnInplaceCopy, BF16 → F32) into `[M, G, R]`.
    fn grouped_linear_bf16(&self, x: &AscendTensor, w: &AscendWeight, groups: usize) -> Result<AscendTensor> {
        let shape = checks::grouped_linear(self.name(), &x.shape, &w.shape, groups)?;
        let (m, k, r) = (shape[0], x.shape[2], shape[2]);
        if m * r == 0 || k == 0 {
            return Ok(AscendTensor { bf16: true, ..self.full(&shape, 0.0)? });
        }
        let xb = self.cast_to(x, Dt::ACL_BF16)?;
        let dequantised = self.bf16_weight(w)?;
        let xa = self.view(Mem::bf16(&xb), &[groups, m, k], &[k, groups * k, 1], 0)?;
        let wb = self.view(Mem::bf16(dequantised.as_ref().unwrap_or(&w.buf)), &[groups, k, r], &[r * k, 1, k], 0)?;
        let gm = self.alloc(groups * m * r, Dt::ACL_BF16)?;
        let gv = self.cview(Mem::bf16(&gm), &[groups, m, r])?;
        // Not through the executor cache: xa is a permuted view (see `grouped_linear`).
        aclnn!(
            self,
            aclnnBatchMatMul / aclnnBatchMatMulGetWorkspaceSize(xa.ptr(), wb.ptr(), gv.ptr(), sys::ACL_CUBE_KEEP_DTYPE)
        )?;
        let out = self.new_tensor(&shape)?;
        let src = self.view(Mem::bf16(&gm), &[m, groups, r], &[r, m * r, 1], 0)?;
        // aclnnInplaceCopy: documented for strided sources, and it converts the dtype.
        self.copy(&self.tv(&out)?, &src)?;
        Ok(AscendTensor { bf16: true, ..out })
    }

    /// Writes `w` widened exactly into the `rows × cols` elements at `dst`, in `dst`'s dtype
    /// (F32; or BF16, which holds every BF16 and quantised-form value): aclnnCast for float
    /// weights; for quantised forms aclnnCast of the codes (INT8 on every SoC, FP4 / FP8 on the
    /// 950, `aclnnCast.md`), then aclnnMul by each row's scales broadcast over their groups.
    fn widen_weight_into(&self, w: &AscendWeight, dst: Mem<'_>) -> Result<()> {
        self.widen_rows_into(w, 0..w.rows, dst)
    }

    /// [`Self::widen_weight_into`] of the weight rows `rows` only (`rows.len() × cols` elements
    /// at `dst`).
    fn widen_rows_into(&self, w: &AscendWeight, rows: std::ops::Range<usize>, dst: Mem<'_>) -> Result<()> {
        let (dims, dt) = ([rows.len(), w.cols], dst.dtype);
        let src = self.cview(Mem { buf: &w.buf, offset: rows.start * w.cols, dtype: w.dtype }, &dims)?;
        let Some(sc) = &w.scales else {
            let d = self.cview(dst, &dims)?;
            if dst.offset != 0 {
                // A slot of the grouped matmul's stack: not cached (one executor per slot).
                return aclnn!(self, aclnnCast / aclnnCastGetWorkspaceSize(src.ptr(), dt, d.ptr()));
            }
            return self.cast_into(src, d, dt);
        };
        let (g, groups, n) = (sc.layout.group(), w.cols / sc.layout.group(), rows.len());
        let codes = self.alloc(n * w.cols, dt)?;
        let cm = Mem { buf: &codes, offset: 0, dtype: dt };
        self.cast_into(src, self.cview(cm, &dims)?, dt)?;
        let scales = self.row_scales(sc, groups, rows.clone(), dt)?;
        let sm = match &scales {
            Some(buf) => Mem { buf, offset: 0, dtype: dt },
            None => Mem { buf: &sc.buf, offset: rows.start * groups, dtype: Dt::ACL_BF16 },
        };
        let (a, b) = (self.cview(cm, &[n, groups, g])?, self.view(sm, &[n, groups, 1], &[groups, 1, 1], 0)?);
        let o = self.cview(dst, &[n, groups, g])?;
        if dst.offset != 0 || sm.offset != 0 {
            return aclnn!(self, aclnnMul / aclnnMulGetWorkspaceSize(a.ptr(), b.ptr(), o.ptr()));
        }
        aclnn_cached!(self, aclnnMul / aclnnMulGetWorkspaceSize, [a, b] => [o], attrs [],
            |i, o| (i[0].ptr(), i[1].ptr(), o[0].ptr()))
    }

    /// The scales of weight rows `rows`, one per row and group of columns (`[rows.len(),
    /// groups]`), as `dt` values in a new block; None when the stored scales already are that
    /// (the INT8 form's BF16 scales, read in place from row `rows.start` on). E8M0 scales are
    /// widened to F32 first ([`Self::e8m0_as_f32`]), and cast only when `dt` is not F32.
    fn row_scales(&self, sc: &Scales, groups: usize, rows: std::ops::Range<usize>, dt: Dt) -> Result<Option<Buffer>> {
        let n = rows.len();
        let widened = match sc.layout {
            ScaleLayout::Int8Groups { .. } if dt == Dt::ACL_BF16 => return Ok(None),
            ScaleLayout::Int8Groups { .. } => None,
            ScaleLayout::Mx => Some(self.e8m0_as_f32(&sc.buf, rows.start * groups, n * groups)?),
            ScaleLayout::Fp8Blocks { rows: br, .. } => {
                // The block rows the weight rows fall in, widened, then one row per weight row.
                let (first, last) = (rows.start / br, (rows.end.max(1) - 1) / br);
                let blocks = last + 1 - first;
                let f = self.e8m0_as_f32(&sc.buf, first * groups, blocks * groups)?;
                let fv = self.cview(Mem { buf: &f, offset: 0, dtype: Dt::ACL_FLOAT }, &[blocks, groups])?;
                let picks: Vec<i32> = rows.clone().map(|r| (r / br - first) as i32).collect();
                let idx = self.upload_index(&picks, &[n])?;
                let per_row = self.alloc(n * groups, Dt::ACL_FLOAT)?;
                let pv = self.cview(Mem { buf: &per_row, offset: 0, dtype: Dt::ACL_FLOAT }, &[n, groups])?;
                let iv = self.iv(&idx)?;
                aclnn!(self, aclnnIndexSelect / aclnnIndexSelectGetWorkspaceSize(fv.ptr(), 0, iv.ptr(), pv.ptr()))?;
                Some(per_row)
            }
        };
        let src = match &widened {
            Some(_) if dt == Dt::ACL_FLOAT => return Ok(widened),
            Some(buf) => Mem { buf, offset: 0, dtype: Dt::ACL_FLOAT },
            None => Mem { buf: &sc.buf, offset: rows.start * groups, dtype: Dt::ACL_BF16 },
        };
        let out = self.alloc(n * groups, dt)?;
        let (sv, o) =
            (self.cview(src, &[n, groups])?, self.cview(Mem { buf: &out, offset: 0, dtype: dt }, &[n, groups])?);
        aclnn!(self, aclnnCast / aclnnCastGetWorkspaceSize(sv.ptr(), dt, o.ptr()))?;
        Ok(Some(out))
    }

    /// E8M0 scale bytes `2^(b−127)` (`n` of them from byte `offset` of `scales`) as F32 values,
    /// for bytes in `1..=254` (the native forms are kept with bytes in 1..=252 or 3..=246 only,
    /// `dsv4_core::weight_forms::checkpoint_form`).
    /// aclnnCast has no E8M0 path (`aclnnCast.md`, the 950's conversion table), so the bytes are
    /// cast as UINT8 to INT32 and multiplied by 2²³ (aclnnMuls), which puts `b` in the F32
    /// exponent field; the INT32 block is then read as FLOAT.
    fn e8m0_as_f32(&self, scales: &Buffer, offset: usize, n: usize) -> Result<Buffer> {
        let ints = self.alloc(n, Dt::ACL_INT32)?;
        let im = Mem { buf: &ints, offset: 0, dtype: Dt::ACL_INT32 };
        let (src, iv) = (self.cview(Mem { buf: scales, offset, dtype: Dt::ACL_UINT8 }, &[n])?, self.cview(im, &[n])?);
        aclnn!(self, aclnnCast / aclnnCastGetWorkspaceSize(src.ptr(), Dt::ACL_INT32, iv.ptr()))?;
        let bits = self.alloc(n, Dt::ACL_INT32)?;
        let bv = self.cview(Mem { buf: &bits, offset: 0, dtype: Dt::ACL_INT32 }, &[n])?;
        let shift = AclScalar::i32(self.api(), 1 << 23)?;
        aclnn!(self, aclnnMuls / aclnnMulsGetWorkspaceSize(iv.ptr(), shift.ptr(), bv.ptr()))?;
        Ok(bits)
    }

    /// `dst ← src` converted to `dtype` (dst's dtype): aclnnCast, through the executor cache
    /// (both views contiguous).
    fn cast_into(&self, src: AclTensor, dst: AclTensor, dtype: Dt) -> Result<()> {
        aclnn_cached!(self, aclnnCast / aclnnCastGetWorkspaceSize, [src] => [dst], attrs [dtype.0],
            |i, o| (i[0].ptr(), dtype, o[0].ptr()))
    }

    /// `x` (f32) cast to `dtype` in a new pooled block of its shape.
    fn cast_to(&self, x: &AscendTensor, dtype: Dt) -> Result<Buffer> {
        let out = self.alloc(numel(&x.shape), dtype)?;
        self.cast_into(self.tv(x)?, self.cview(Mem { buf: &out, offset: 0, dtype }, &x.shape)?, dtype)?;
        Ok(out)
    }

    /// The 950's native weight forms at open ([`kernels::NATIVE_LOW_BIT_WEIGHTS`]): an FP8
    /// weight of every non-NaN code (one 128×128 block) and an MXFP4 weight of every code pair
    /// (all 256 bytes), kept as stored, multiplied in f32 by the identity, against the host's
    /// dequantisation value for value. A disagreement (another nibble order, a Cast that
    /// flushes subnormals) or a failing operator (a release without those Cast paths) switches
    /// the native forms off: weights then take the A2/A3 forms.
    fn self_test_native_weights(&self) -> Result<()> {
        use dsv4_core::tensor::{DType, HostTensor};
        let state = &self.kernels.native_weights;
        if !state.usable() {
            return Ok(());
        }
        let fp8_codes: Vec<u8> = (0..128 * 128).map(|i| if i % 128 == 0x7F { 0 } else { i as u8 }).collect();
        let fp8 = StoredWeight::detect(
            &HostTensor::from_bytes("self-test FP8 weight", DType::F8E4M3, vec![128, 128], fp8_codes)?,
            Some(&HostTensor::from_bytes("self-test FP8 scale", DType::F8E8M0, vec![1, 1], vec![120])?),
            &[128, 128],
        )?;
        let fp4 = StoredWeight::detect(
            &HostTensor::from_bytes("self-test FP4 weight", DType::I8, vec![8, 32], (0..=255u8).collect())?,
            Some(&HostTensor::from_bytes(
                "self-test FP4 scales",
                DType::F8E8M0,
                vec![8, 2],
                (0..16).map(|i| 118 + i as u8).collect(),
            )?),
            &[8, 64],
        )?;
        for (w, native) in [(&fp8, Dt::ACL_FLOAT8_E4M3FN), (&fp4, Dt::ACL_FLOAT4_E2M1)] {
            let kept = self.upload_weight(w)?;
            if kept.dtype != native {
                continue;
            }
            let k = kept.cols;
            let identity: Vec<f32> = (0..k * k).map(|i| f32::from(u8::from(i / k == i % k))).collect();
            // A release whose aclnnCast lacks the FP8 / FP4 paths fails here: the native forms are
            // then switched off with its error, and the device opens.
            let widened = || self.download(&self.linear(&self.upload(&identity, &[k, k])?, &kept)?);
            let Some(got) = self.fused(state, widened)? else {
                return Ok(());
            };
            let want = dsv4_core::quant::dequantize(w)?;
            // got[i][j] = W[j][i].
            let off = (0..got.len()).find(|&p| got[p] != want[(p % kept.rows) * k + p / kept.rows]);
            if let Some(p) = off {
                let (i, j) = (p / kept.rows, p % kept.rows);
                state.disable(format!(
                    "self-test: the device widened {} [{j}, {i}] to {} where the host's dequantisation gives {}",
                    w.name,
                    got[p],
                    want[j * k + i]
                ));
                return Ok(());
            }
        }
        Ok(())
    }

    /// An FP4 e2m1 weight with E8M0 scales per `group` in its exact INT8 form
    /// (`dsv4_core::weight_forms`): the codes doubled to INT8 (−12..12), one BF16 scale
    /// `2^(b−128)` per group. 1 + 2/group bytes per value instead of the 2 of BF16.
    fn upload_fp4_as_int8(&self, w: &StoredWeight, group: usize) -> Result<AscendWeight> {
        use dsv4_core::weight_forms::{fp4_as_int8, int8_group_scale_bf16};
        let (packed, scale_bytes) = fp4_parts(w, group)?;
        let codes: Vec<u8> =
            packed.iter().flat_map(|&b| [fp4_as_int8(b & 0xF) as u8, fp4_as_int8(b >> 4) as u8]).collect();
        let mut scales = Vec::with_capacity(scale_bytes.len() * 2);
        for &b in scale_bytes {
            let s =
                int8_group_scale_bf16(b).ok_or_else(|| err(format!("upload_weight {}: NaN scale byte 255", w.name)))?;
            scales.extend_from_slice(&s.to_le_bytes());
        }
        self.upload_quantised(w, Dt::ACL_INT8, &codes, &scales, ScaleLayout::Int8Groups { group })
    }

    /// An MXFP4 weight (FP4 e2m1, one E8M0 per 32) as stored, on the 950: 0.5 + 1/32 bytes per
    /// value, where `checkpoint_form` says so ([`Self::upload_weight`]).
    fn upload_mxfp4(&self, w: &StoredWeight) -> Result<AscendWeight> {
        let (packed, scales) = fp4_parts(w, 32)?;
        self.upload_quantised(w, Dt::ACL_FLOAT4_E2M1, packed, scales, ScaleLayout::Mx)
    }

    /// An FP8 e4m3 weight with E8M0 block scales as stored, on the 950: 1 byte per value plus
    /// one per block, where `checkpoint_form` says so ([`Self::upload_weight`]).
    fn upload_fp8_blocks(&self, w: &StoredWeight, rows: usize, cols: usize) -> Result<AscendWeight> {
        let scale = w.scale.as_ref().ok_or_else(|| err(format!("upload_weight {}: FP8 without scales", w.name)))?;
        let layout = ScaleLayout::Fp8Blocks { rows, cols };
        self.upload_quantised(w, Dt::ACL_FLOAT8_E4M3FN, w.data.bytes(), scale.bytes(), layout)
    }

    /// Uploads the codes (`dtype`) and scales of a quantised form, checking their sizes.
    fn upload_quantised(
        &self,
        w: &StoredWeight,
        dtype: Dt,
        codes: &[u8],
        scales: &[u8],
        layout: ScaleLayout,
    ) -> Result<AscendWeight> {
        let (rows, cols) = (w.shape[0], w.shape.iter().skip(1).product::<usize>());
        let scale_count = rows.div_ceil(layout.rows_per_scale()) * (cols / layout.group());
        if codes.len() != acl::bytes_for(rows * cols, dtype) || scales.len() != scale_count * esize(layout.dtype()) {
            return Err(err(format!(
                "upload_weight {}: {} code bytes and {} scale bytes do not fit [{rows}, {cols}] in {layout:?}",
                w.name,
                codes.len(),
                scales.len()
            )));
        }
        let buf = self.alloc(rows * cols, dtype)?;
        self.dev.upload_bytes(&buf, codes)?;
        let sbuf = self.alloc(scale_count, layout.dtype())?;
        self.dev.upload_bytes(&sbuf, scales)?;
        Ok(AscendWeight { buf, shape: w.shape.clone(), dtype, rows, cols, scales: Some(Scales { buf: sbuf, layout }) })
    }

    /// A BOOL tensor `idx < 0` (or `idx == value` with `eq`) over an index tensor.
    fn index_flag(&self, idx: &AscendIndex, eq: Option<i32>) -> Result<Buffer> {
        let n = numel(&idx.shape);
        let flag = self.alloc(n, Dt::ACL_BOOL)?;
        let fv = self.cview(Mem { buf: &flag, offset: 0, dtype: Dt::ACL_BOOL }, &idx.shape)?;
        let iv = self.iv(idx)?;
        match eq {
            Some(v) => aclnn_cached!(self, aclnnEqScalar / aclnnEqScalarGetWorkspaceSize, [iv] => [fv],
                scalars [AclScalar::i32(self.api(), v)?], attrs [], |i, o, s| (i[0].ptr(), s[0].ptr(), o[0].ptr()))?,
            None => aclnn_cached!(self, aclnnLtScalar / aclnnLtScalarGetWorkspaceSize, [iv] => [fv],
                scalars [AclScalar::i32(self.api(), 0)?], attrs [], |i, o, s| (i[0].ptr(), s[0].ptr(), o[0].ptr()))?,
        }
        Ok(flag)
    }

    /// Rows `idx` (any shape; `-1` gives a zero row) of the `[rows, row]` matrix `src` (F32, or
    /// a narrower float type widened after the gather), as an f32 tensor of `shape`
    /// (`idx.shape ++ the row's shape`): aclnnLtScalar, aclnnInplaceCopy +
    /// aclnnInplaceMaskedFillScalar (the index with -1 → 0), aclnnIndexSelect (+ aclnnCast),
    /// aclnnInplaceMaskedFillScalar (zero the -1 rows).
    fn select_rows(
        &self,
        src: Mem<'_>,
        rows: usize,
        row: usize,
        idx: &AscendIndex,
        shape: &[usize],
    ) -> Result<AscendTensor> {
        self.select_rows_as(src, rows, row, idx, shape, row, |narrow, n, out| {
            aclnn_cached!(self, aclnnCast / aclnnCastGetWorkspaceSize, [self.cview(narrow, &[n, row])?] => [self.cview(self.tmem(out), &[n, row])?],
                attrs [Dt::ACL_FLOAT.0], |i, o| (i[0].ptr(), Dt::ACL_FLOAT, o[0].ptr()))
        })
    }

    /// [`Self::select_rows`] for rows stored as `stored` elements of `src.dtype` and read as
    /// `row` f32 values: `widen(gathered, n, out)` turns the `[n, stored]` gathered rows into
    /// `out`'s `[n, row]` (before the -1 rows are zeroed). F32 rows are gathered into `out`
    /// directly.
    #[allow(clippy::too_many_arguments)]
    fn select_rows_as(
        &self,
        src: Mem<'_>,
        rows: usize,
        stored: usize,
        idx: &AscendIndex,
        shape: &[usize],
        row: usize,
        widen: impl FnOnce(Mem<'_>, usize, &AscendTensor) -> Result<()>,
    ) -> Result<AscendTensor> {
        let n = numel(&idx.shape);
        if n * row == 0 || rows == 0 {
            // Nothing to gather (with no rows, every index must be -1).
            return self.full(shape, 0.0);
        }
        let neg = self.index_flag(idx, None)?;
        let negv = |dims: &[usize]| self.cview(Mem { buf: &neg, offset: 0, dtype: Dt::ACL_BOOL }, dims);
        let safe = self.new_index(&[n])?;
        let sv = self.iv(&safe)?;
        self.copy(&sv, &self.cview(self.imem(idx), &[n])?)?;
        let zero_i = AclScalar::i32(self.api(), 0)?;
        let nv = negv(&[n])?;
        aclnn!(
            self,
            aclnnInplaceMaskedFillScalar
                / aclnnInplaceMaskedFillScalarGetWorkspaceSize(sv.ptr(), nv.ptr(), zero_i.ptr())
        )?;
        let out = self.new_tensor(shape)?;
        let xv = self.cview(src, &[rows, stored])?;
        let sv = self.iv(&safe)?;
        if src.dtype == Dt::ACL_FLOAT && stored == row {
            let ov = self.cview(self.tmem(&out), &[n, row])?;
            aclnn_cached!(self, aclnnIndexSelect / aclnnIndexSelectGetWorkspaceSize, [xv, sv] => [ov], attrs [0],
                |i, o| (i[0].ptr(), 0, i[1].ptr(), o[0].ptr()))?;
        } else {
            // Gather in the stored type, then widen (exact).
            let tmp = self.alloc(n * stored, src.dtype)?;
            let narrow = Mem { buf: &tmp, offset: 0, dtype: src.dtype };
            aclnn_cached!(self, aclnnIndexSelect / aclnnIndexSelectGetWorkspaceSize, [xv, sv] => [self.cview(narrow, &[n, stored])?],
                attrs [0], |i, o| (i[0].ptr(), 0, i[1].ptr(), o[0].ptr()))?;
            widen(narrow, n, &out)?;
        }
        let ov = self.cview(self.tmem(&out), &[n, row])?;
        let (mask, zero) = (negv(&[n, 1])?, self.f32s(0.0)?);
        aclnn!(
            self,
            aclnnInplaceMaskedFillScalar
                / aclnnInplaceMaskedFillScalarGetWorkspaceSize(ov.ptr(), mask.ptr(), zero.ptr())
        )?;
        Ok(out)
    }

    fn unary_op(&self, x: AclTensor, out: AclTensor, op: UnaryOp) -> Result<()> {
        macro_rules! plain {
            ($op:ident / $ws:ident) => {
                aclnn_cached!(self, $op / $ws, [x] => [out], attrs [], |i, o| (i[0].ptr(), o[0].ptr()))
            };
        }
        match op {
            UnaryOp::Sigmoid => plain!(aclnnSigmoid / aclnnSigmoidGetWorkspaceSize),
            UnaryOp::Silu => plain!(aclnnSilu / aclnnSiluGetWorkspaceSize),
            UnaryOp::Softplus => aclnn_cached!(self, aclnnSoftplus / aclnnSoftplusGetWorkspaceSize, [x] => [out],
                scalars [self.f32s(1.0)?, self.f32s(20.0)?], attrs [],
                |i, o, s| (i[0].ptr(), s[0].ptr(), s[1].ptr(), o[0].ptr()))
            .map_err(|e| self.softplus_missing(e)),
            UnaryOp::Sqrt => plain!(aclnnSqrt / aclnnSqrtGetWorkspaceSize),
            UnaryOp::Rsqrt => plain!(aclnnRsqrt / aclnnRsqrtGetWorkspaceSize),
            UnaryOp::Exp => plain!(aclnnExp / aclnnExpGetWorkspaceSize),
            UnaryOp::Relu => plain!(aclnnRelu / aclnnReluGetWorkspaceSize),
            UnaryOp::Neg => plain!(aclnnNeg / aclnnNegGetWorkspaceSize),
            UnaryOp::Square => {
                let (x, o) = (x.ptr(), out.ptr());
                aclnn!(self, aclnnMul / aclnnMulGetWorkspaceSize(x, x, o))
            }
        }
    }
}

/// The packed codes and scale bytes of an FP4 weight with E8M0 scales per whole `group`.
fn fp4_parts(w: &StoredWeight, group: usize) -> Result<(&[u8], &[u8])> {
    let (rows, cols) = (w.shape[0], w.shape.iter().skip(1).product::<usize>());
    let scale = w.scale.as_ref().ok_or_else(|| err(format!("upload_weight {}: FP4 without scales", w.name)))?;
    let (packed, scale_bytes) = (w.data.bytes(), scale.bytes());
    if group == 0 || cols % group != 0 || packed.len() * 2 != rows * cols || scale_bytes.len() != rows * cols / group {
        return Err(err(format!("upload_weight {}: FP4 layout does not fit [{rows}, {cols}] / {group}", w.name)));
    }
    Ok((packed, scale_bytes))
}

/// Whether every value survives a round trip through BF16.
fn exact_in_bf16(v: &[f32]) -> bool {
    v.iter().all(|x| f32::from_bits(x.to_bits() & 0xFFFF_0000) == *x || x.is_nan())
}

impl Backend for AscendBackend {
    type Tensor = AscendTensor;
    type Index = AscendIndex;
    type Weight = AscendWeight;
    type Pool = AscendPool;

    fn name(&self) -> &str {
        "ascend"
    }

    fn describe(&self) -> String {
        let mem = acl::mem_info(&self.dev)
            .map(|(free, total)| format!(", {} of {} MiB free", free >> 20, total >> 20))
            .unwrap_or_default();
        let how = if self.api().is_emulator() { " on dsv4's CPU emulator" } else { "" };
        format!("Ascend {} device {}{mem}{how}", self.soc, self.dev.id)
    }

    /// `aclrtGetMemInfo`'s free bytes.
    fn free_memory(&self) -> Option<usize> {
        acl::mem_info(&self.dev).map(|(free, _)| free)
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<AscendTensor> {
        checks::upload(self.name(), data.len(), shape)?;
        let t = self.new_tensor(shape)?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.dev.upload_bytes(&t.buf, &bytes)?;
        // Values that are all BF16 values may take the BF16 matmuls (`linear_act`): the host
        // steps of `official` (e4m3-quantised inputs: a 4-bit significand times a power of two)
        // upload such values.
        Ok(AscendTensor { bf16: exact_in_bf16(data), ..t })
    }

    fn download(&self, t: &AscendTensor) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; numel(&t.shape) * 4];
        self.dev.download_bytes(t.buf.ptr + (t.offset * 4) as u64, &mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn upload_index(&self, data: &[i32], shape: &[usize]) -> Result<AscendIndex> {
        checks::upload_index(self.name(), data.len(), shape)?;
        let mut t = self.new_index(shape)?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.dev.upload_bytes(&t.buf, &bytes)?;
        t.host = Some(data.into());
        Ok(t)
    }

    fn download_index(&self, t: &AscendIndex) -> Result<Vec<i32>> {
        let mut bytes = vec![0u8; numel(&t.shape) * 4];
        self.dev.download_bytes(t.buf.ptr + (t.offset * 4) as u64, &mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// F32 / BF16 / F16 as stored; FP8 / FP4 in the form `dsv4_core::weight_forms::checkpoint_form`
    /// gives this SoC: on the 950 FP8 with E8M0 blocks and MXFP4 as stored
    /// ([`Self::upload_fp8_blocks`], [`Self::upload_mxfp4`]); FP4 with E8M0 scales per whole group
    /// as INT8 + BF16 group scales ([`Self::upload_fp4_as_int8`]); the rest dequantised, BF16 or
    /// F32 as that function says.
    fn upload_weight(&self, w: &StoredWeight) -> Result<AscendWeight> {
        let (dtype, bytes): (Dt, Vec<u8>) = match (w.format, w.data.dtype) {
            (WeightFormat::Float, DType::F32) => (Dt::ACL_FLOAT, w.data.bytes().to_vec()),
            (WeightFormat::Float, DType::BF16) => (Dt::ACL_BF16, w.data.bytes().to_vec()),
            (WeightFormat::Float, DType::F16) => (Dt::ACL_FLOAT16, w.data.bytes().to_vec()),
            (WeightFormat::Float, DType::F64) => {
                (Dt::ACL_FLOAT, w.data.to_f32_vec()?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            (WeightFormat::Float, other) => {
                return Err(Error::Tensor {
                    name: w.name.clone(),
                    file: w.data.source.clone(),
                    msg: format!("the Ascend backend cannot use {other} weights"),
                })
            }
            // FP8 / FP4: the form `checkpoint_form` gives this SoC (what `dsv4 inspect --soc`
            // and `dsv4 plan` count): as stored on the 950 where it can, else the exact A2/A3
            // forms, else the dequantised values (BF16 when checkpoint_form says every value
            // is one, F32 otherwise).
            (WeightFormat::Fp8Block { .. } | WeightFormat::Fp4Group { .. }, _) => {
                match (checkpoint_form(w, self.weight_soc()), w.format) {
                    (DeviceForm::Mxfp4 { .. }, _) => return self.upload_mxfp4(w),
                    (DeviceForm::Fp8Blocks { .. }, WeightFormat::Fp8Block { rows, cols }) => {
                        return self.upload_fp8_blocks(w, rows, cols)
                    }
                    (DeviceForm::Int8Groups { group }, _) => return self.upload_fp4_as_int8(w, group),
                    (form, _) => {
                        let v = dsv4_core::quant::dequantize(w)?;
                        // (By construction every value is a BF16 value where checkpoint_form
                        // says BF16: `weight_forms`' tests check it code by code.)
                        if form == DeviceForm::Bf16 && exact_in_bf16(&v) {
                            let bf16 = v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes());
                            (Dt::ACL_BF16, bf16.collect())
                        } else {
                            (Dt::ACL_FLOAT, v.iter().flat_map(|x| x.to_le_bytes()).collect())
                        }
                    }
                }
            }
        };
        let rows = *w.shape.first().unwrap_or(&1);
        let cols = w.shape.iter().skip(1).product();
        if rows * cols * esize(dtype) != bytes.len() {
            return Err(err(format!("upload_weight {}: {} bytes for shape {:?}", w.name, bytes.len(), w.shape)));
        }
        let buf = self.alloc(rows * cols, dtype)?;
        self.dev.upload_bytes(&buf, &bytes)?;
        Ok(AscendWeight { buf, shape: w.shape.clone(), dtype, rows, cols, scales: None })
    }

    fn weight_shape<'w>(&self, w: &'w AscendWeight) -> &'w [usize] {
        &w.shape
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn full(&self, shape: &[usize], value: f32) -> Result<AscendTensor> {
        checks::full(self.name(), shape)?;
        let t = self.new_tensor(shape)?;
        if numel(shape) > 0 {
            self.fill(&self.tv(&t)?, &self.f32s(value)?)?;
        }
        Ok(t)
    }

    /// F32 and BF16 rows everywhere; fp8 rows on the Ascend 950 with its FP8 casts
    /// ([`AscendBackend::fp8_rows_unavailable`]).
    fn supports_row_format(&self, format: RowFormat) -> bool {
        !matches!(format, RowFormat::Fp8 { .. }) || self.fp8_rows_unavailable().is_none()
    }

    /// One device block, zeroed on the stream (aclrtMemsetAsync); F32 rows as ACL_FLOAT, BF16
    /// rows as ACL_BF16, fp8 rows as their bytes (ACL_UINT8; the 950 only; see `pool`).
    fn alloc_pool(&self, rows: usize, width: usize, format: RowFormat) -> Result<AscendPool> {
        self.new_pool(rows, width, format)
    }

    /// aclnnInplaceIndexCopy along dim 0 (after aclnnCast to BF16 for BF16 pools; fp8 rows are
    /// encoded on the host); the slots are checked on the host first.
    fn pool_write(&self, pool: &mut AscendPool, slots: &AscendIndex, values: &AscendTensor) -> Result<()> {
        self.write_rows(pool, slots, values)
    }

    /// As `index_select` on the pool's block (aclnnIndexSelect, + aclnnCast for BF16 pools, + the
    /// fp8 rows' decoding: `pool`).
    fn pool_read(&self, pool: &AscendPool, slots: &AscendIndex) -> Result<AscendTensor> {
        self.read_rows(pool, slots)
    }

    fn linear(&self, x: &AscendTensor, w: &AscendWeight) -> Result<AscendTensor> {
        let shape = checks::linear(self.name(), &x.shape, &w.shape)?;
        let k = w.cols;
        let m = numel(&x.shape) / k.max(1);
        let out = self.new_tensor(&shape)?;
        if numel(&shape) == 0 {
            return Ok(out);
        }
        if k == 0 {
            return self.full(&shape, 0.0);
        }
        // A narrow weight is widened to F32 for the f32 matmul: in blocks of rows when the
        // whole copy would pass the budget (the head: 129280 × 7168 values are 3.7 GB in F32),
        // each block's outputs copied into their columns (for one input row the block's
        // columns are contiguous, and the Matmul writes them in place). Every output depends
        // on its own weight row only: the same values up to the summation order the hardware
        // picks per shape (the emulator's bits are the same). A quantised weight also
        // takes an F32 copy of its codes while it is widened, so 8 bytes a value count.
        let per_row = k * if w.scales.is_some() { 8 } else { 4 };
        let block = (self.linear_widen_bytes / per_row).max(1);
        if w.dtype != Dt::ACL_FLOAT && block < w.rows {
            for r0 in (0..w.rows).step_by(block) {
                let a = self.cview(self.tmem(x), &[m, k])?;
                let rb = block.min(w.rows - r0);
                let tmp = self.alloc(rb * k, Dt::ACL_FLOAT)?;
                let tm = Mem { buf: &tmp, offset: 0, dtype: Dt::ACL_FLOAT };
                self.widen_rows_into(w, r0..r0 + rb, tm)?;
                let w_t = self.view(tm, &[k, rb], &[1, k], 0)?;
                if m == 1 {
                    let o = self.view(self.tmem(&out), &[1, rb], &[rb, 1], r0)?;
                    aclnn_cached!(self, aclnnMatmul / aclnnMatmulGetWorkspaceSize, [a, w_t] => [o],
                        attrs [sys::ACL_CUBE_KEEP_DTYPE], |i, o| (i[0].ptr(), i[1].ptr(), o[0].ptr(), sys::ACL_CUBE_KEEP_DTYPE))?;
                    continue;
                }
                let part = self.alloc(m * rb, Dt::ACL_FLOAT)?;
                let pm = Mem { buf: &part, offset: 0, dtype: Dt::ACL_FLOAT };
                let o = self.cview(pm, &[m, rb])?;
                aclnn_cached!(self, aclnnMatmul / aclnnMatmulGetWorkspaceSize, [a, w_t] => [o],
                    attrs [sys::ACL_CUBE_KEEP_DTYPE], |i, o| (i[0].ptr(), i[1].ptr(), o[0].ptr(), sys::ACL_CUBE_KEEP_DTYPE))?;
                self.copy(&self.view(self.tmem(&out), &[m, rb], &[w.rows, 1], r0)?, &self.cview(pm, &[m, rb])?)?;
            }
            return Ok(out);
        }
        let (_tmp, wt) = self.weight_f32(w)?;
        // W [N, K] read as its transpose [K, N] through strides: no copy.
        let wbuf = _tmp.as_ref().unwrap_or(&w.buf);
        let w_t = self.view(Mem { buf: wbuf, offset: 0, dtype: Dt::ACL_FLOAT }, &[k, w.rows], &[1, k], 0)?;
        drop(wt);
        let (a, o) = (self.cview(self.tmem(x), &[m, k])?, self.cview(self.tmem(&out), &[m, w.rows])?);
        aclnn_cached!(self, aclnnMatmul / aclnnMatmulGetWorkspaceSize, [a, w_t] => [o], attrs [sys::ACL_CUBE_KEEP_DTYPE],
            |i, o| (i[0].ptr(), i[1].ptr(), o[0].ptr(), sys::ACL_CUBE_KEEP_DTYPE))?;
        Ok(out)
    }

    fn grouped_linear(&self, x: &AscendTensor, w: &AscendWeight, groups: usize) -> Result<AscendTensor> {
        let shape = checks::grouped_linear(self.name(), &x.shape, &w.shape, groups)?;
        let (m, k, r) = (shape[0], x.shape[2], shape[2]);
        let out = self.new_tensor(&[m, groups, r])?;
        if m * r == 0 {
            return Ok(out);
        }
        let (tmp, _wt) = self.weight_f32(w)?;
        let wbuf = tmp.as_ref().unwrap_or(&w.buf);
        // x [M, G, K] as [G, M, K]; W [G·R, K] as [G, K, R]; result [G, M, R] then [M, G, R].
        let xa = self.view(self.tmem(x), &[groups, m, k], &[k, groups * k, 1], 0)?;
        let wb = self.view(Mem { buf: wbuf, offset: 0, dtype: Dt::ACL_FLOAT }, &[groups, k, r], &[r * k, 1, k], 0)?;
        let gm = self.new_tensor(&[groups, m, r])?;
        let gv = self.tv(&gm)?;
        // Not through the executor cache: xa is a permuted view, which the operator copies
        // internally, and the docs exclude such operators from executor reuse.
        aclnn!(
            self,
            aclnnBatchMatMul / aclnnBatchMatMulGetWorkspaceSize(xa.ptr(), wb.ptr(), gv.ptr(), sys::ACL_CUBE_KEEP_DTYPE)
        )?;
        let src = self.view(self.tmem(&gm), &[m, groups, r], &[r, m * r, 1], 0)?;
        self.copy(&self.tv(&out)?, &src)?;
        Ok(out)
    }

    fn embedding(&self, table: &AscendWeight, ids: &AscendIndex) -> Result<AscendTensor> {
        let d = table.cols;
        let shape = checks::embedding(self.name(), &table.shape, &ids.shape, ids.bounds())?;
        let out = self.new_tensor(&shape)?;
        if numel(&shape) == 0 {
            return Ok(out);
        }
        // A quantised table is widened whole first (V4's embedding is BF16; this keeps other
        // checkpoints correct).
        let (widened, dtype) = match table.scales {
            Some(_) => (self.weight_f32(table)?.0, Dt::ACL_FLOAT),
            None => (None, table.dtype),
        };
        let tbl =
            self.cview(Mem { buf: widened.as_ref().unwrap_or(&table.buf), offset: 0, dtype }, &[table.rows, d])?;
        let iv = self.iv(ids)?;
        if dtype == Dt::ACL_FLOAT {
            let o = self.tv(&out)?;
            aclnn!(self, aclnnEmbedding / aclnnEmbeddingGetWorkspaceSize(tbl.ptr(), iv.ptr(), o.ptr()))?;
        } else {
            // Gather in the stored type, then widen (exact).
            let tmp = self.alloc(numel(&shape), table.dtype)?;
            let tv = self.cview(Mem { buf: &tmp, offset: 0, dtype: table.dtype }, &shape)?;
            aclnn!(self, aclnnEmbedding / aclnnEmbeddingGetWorkspaceSize(tbl.ptr(), iv.ptr(), tv.ptr()))?;
            let o = self.tv(&out)?;
            aclnn!(self, aclnnCast / aclnnCastGetWorkspaceSize(tv.ptr(), Dt::ACL_FLOAT, o.ptr()))?;
        }
        Ok(out)
    }

    fn matmul(&self, a: &AscendTensor, b: &AscendTensor, transpose_b: bool) -> Result<AscendTensor> {
        let checks::MatmulDims { k, n, out: shape, .. } = checks::matmul(self.name(), &a.shape, &b.shape, transpose_b)?;
        let br = b.shape.len();
        if numel(&shape) == 0 {
            return self.new_tensor(&shape);
        }
        if k == 0 {
            return self.full(&shape, 0.0);
        }
        let mut bdims = b.shape[..br - 2].to_vec();
        let mut bst = strides(&b.shape);
        if transpose_b {
            bdims.extend([k, n]);
            bst.swap(br - 2, br - 1);
        } else {
            bdims.extend([k, n]);
        }
        let out = self.new_tensor(&shape)?;
        let (av, bv, ov) = (self.tv(a)?, self.view(self.tmem(b), &bdims, &bst, 0)?, self.tv(&out)?);
        aclnn_cached!(self, aclnnMatmul / aclnnMatmulGetWorkspaceSize, [av, bv] => [ov], attrs [sys::ACL_CUBE_KEEP_DTYPE],
            |i, o| (i[0].ptr(), i[1].ptr(), o[0].ptr(), sys::ACL_CUBE_KEEP_DTYPE))?;
        Ok(out)
    }

    fn unary(&self, x: &AscendTensor, op: UnaryOp) -> Result<AscendTensor> {
        checks::unary(self.name(), &x.shape)?;
        let out = self.new_tensor(&x.shape)?;
        if numel(&x.shape) > 0 {
            self.unary_op(self.tv(x)?, self.tv(&out)?, op)?;
        }
        Ok(out)
    }

    /// aclnnCast to BF16 (round to nearest even) into a pooled temporary, then aclnnCast back
    /// to FLOAT (exact).
    fn round_to_bf16(&self, x: &AscendTensor) -> Result<AscendTensor> {
        checks::unary(self.name(), &x.shape)?;
        let out = self.new_tensor(&x.shape)?;
        let n = numel(&x.shape);
        if n == 0 {
            return Ok(out);
        }
        let tmp = self.alloc(n, Dt::ACL_BF16)?;
        let narrow = || self.cview(Mem { buf: &tmp, offset: 0, dtype: Dt::ACL_BF16 }, &x.shape);
        aclnn_cached!(self, aclnnCast / aclnnCastGetWorkspaceSize, [self.tv(x)?] => [narrow()?], attrs [Dt::ACL_BF16.0],
            |i, o| (i[0].ptr(), Dt::ACL_BF16, o[0].ptr()))?;
        aclnn_cached!(self, aclnnCast / aclnnCastGetWorkspaceSize, [narrow()?] => [self.tv(&out)?], attrs [Dt::ACL_FLOAT.0],
            |i, o| (i[0].ptr(), Dt::ACL_FLOAT, o[0].ptr()))?;
        Ok(AscendTensor { bf16: true, ..out })
    }

    fn linear_act(&self, x: &AscendTensor, w: &AscendWeight, act: Precision) -> Result<AscendTensor> {
        if self.bf16_matmul_applies(x, w, act) {
            if let Some(y) = self.fused(&self.kernels.linear_bf16, || self.linear_bf16(x, w))? {
                return Ok(y);
            }
        }
        act.act_of(self, self.linear(x, w))
    }

    fn grouped_linear_act(
        &self,
        x: &AscendTensor,
        w: &AscendWeight,
        groups: usize,
        act: Precision,
    ) -> Result<AscendTensor> {
        if self.bf16_matmul_applies(x, w, act) {
            if let Some(y) = self.fused(&self.kernels.linear_bf16, || self.grouped_linear_bf16(x, w, groups))? {
                return Ok(y);
            }
        }
        act.act_of(self, self.grouped_linear(x, w, groups))
    }

    fn binary(&self, a: &AscendTensor, b: &AscendTensor, op: BinaryOp) -> Result<AscendTensor> {
        let shape = checks::binary(self.name(), &a.shape, &b.shape)?;
        let out = self.new_tensor(&shape)?;
        if numel(&shape) == 0 {
            return Ok(out);
        }
        let (av, bv, ov) = (self.tv(a)?, self.tv(b)?, self.tv(&out)?);
        macro_rules! plain {
            ($op:ident / $ws:ident) => {
                aclnn_cached!(self, $op / $ws, [av, bv] => [ov], attrs [], |i, o| (i[0].ptr(), i[1].ptr(), o[0].ptr()))
            };
        }
        // out = self + alpha · other, alpha 1.
        macro_rules! with_alpha {
            ($op:ident / $ws:ident) => {
                aclnn_cached!(self, $op / $ws, [av, bv] => [ov], scalars [self.f32s(1.0)?], attrs [],
                    |i, o, s| (i[0].ptr(), i[1].ptr(), s[0].ptr(), o[0].ptr()))
            };
        }
        match op {
            BinaryOp::Add => with_alpha!(aclnnAdd / aclnnAddGetWorkspaceSize)?,
            BinaryOp::Sub => with_alpha!(aclnnSub / aclnnSubGetWorkspaceSize)?,
            BinaryOp::Mul => plain!(aclnnMul / aclnnMulGetWorkspaceSize)?,
            BinaryOp::Div => plain!(aclnnDiv / aclnnDivGetWorkspaceSize)?,
            BinaryOp::Max => plain!(aclnnMaximum / aclnnMaximumGetWorkspaceSize)?,
            BinaryOp::Min => plain!(aclnnMinimum / aclnnMinimumGetWorkspaceSize)?,
        }
        Ok(out)
    }

    fn affine(&self, x: &AscendTensor, mul: f32, add: f32) -> Result<AscendTensor> {
        checks::affine(self.name(), &x.shape)?;
        if mul == 1.0 && add == 0.0 {
            return Ok(x.clone());
        }
        let out = self.new_tensor(&x.shape)?;
        if numel(&x.shape) == 0 {
            return Ok(out);
        }
        let (xv, ov) = (self.tv(x)?, self.tv(&out)?);
        if mul == 1.0 {
            aclnn_cached!(self, aclnnAdds / aclnnAddsGetWorkspaceSize, [xv] => [ov],
                scalars [self.f32s(add)?, self.f32s(1.0)?], attrs [],
                |i, o, s| (i[0].ptr(), s[0].ptr(), s[1].ptr(), o[0].ptr()))?;
            return Ok(out);
        }
        aclnn_cached!(self, aclnnMuls / aclnnMulsGetWorkspaceSize, [xv] => [ov], scalars [self.f32s(mul)?],
            attrs [], |i, o, s| (i[0].ptr(), s[0].ptr(), o[0].ptr()))?;
        if add != 0.0 {
            // In place on the result, so not through the executor cache (the docs exclude
            // operators whose copies have the same source and destination from reuse).
            let (ov, s, one) = (self.tv(&out)?, self.f32s(add)?, self.f32s(1.0)?);
            aclnn!(self, aclnnAdds / aclnnAddsGetWorkspaceSize(ov.ptr(), s.ptr(), one.ptr(), ov.ptr()))?;
        }
        Ok(out)
    }

    fn clamp(&self, x: &AscendTensor, min: f32, max: f32) -> Result<AscendTensor> {
        checks::clamp(self.name(), &x.shape)?;
        let out = self.new_tensor(&x.shape)?;
        if numel(&x.shape) == 0 {
            return Ok(out);
        }
        let (xv, ov) = (self.tv(x)?, self.tv(&out)?);
        aclnn_cached!(self, aclnnClamp / aclnnClampGetWorkspaceSize, [xv] => [ov],
            scalars [self.f32s(min)?, self.f32s(max)?], attrs [],
            |i, o, s| (i[0].ptr(), s[0].ptr(), s[1].ptr(), o[0].ptr()))?;
        Ok(out)
    }

    fn reduce(&self, x: &AscendTensor, axis: usize, op: ReduceOp) -> Result<AscendTensor> {
        let shape = checks::reduce(self.name(), &x.shape, axis)?;
        if numel(&shape) == 0 {
            return self.new_tensor(&shape);
        }
        if x.shape[axis] == 0 {
            let v = match op {
                ReduceOp::Sum => 0.0,
                ReduceOp::Mean => f32::NAN,
                ReduceOp::Max => f32::NEG_INFINITY,
            };
            return self.full(&shape, v);
        }
        let out = self.new_tensor(&shape)?;
        let (xv, ov, dims) = (self.tv(x)?, self.tv(&out)?, AclIntArray::new(self.api(), &[axis as i64])?);
        let (s, d, o) = (xv.ptr(), dims.ptr(), ov.ptr());
        match op {
            ReduceOp::Sum => {
                aclnn!(self, aclnnReduceSum / aclnnReduceSumGetWorkspaceSize(s, d, true, Dt::ACL_FLOAT, o))?
            }
            ReduceOp::Mean => aclnn!(self, aclnnMean / aclnnMeanGetWorkspaceSize(s, d, true, Dt::ACL_FLOAT, o))?,
            ReduceOp::Max => aclnn!(self, aclnnAmax / aclnnAmaxGetWorkspaceSize(s, d, true, o))?,
        }
        Ok(out)
    }

    /// aclnnSoftmax, then lanes whose maximum is `-inf` (fully masked) set to 0 as the trait
    /// specifies (the operator itself gives NaN there, like torch).
    fn softmax(&self, x: &AscendTensor, axis: usize) -> Result<AscendTensor> {
        checks::softmax(self.name(), &x.shape, axis)?;
        let out = self.new_tensor(&x.shape)?;
        if numel(&x.shape) == 0 {
            return Ok(out);
        }
        aclnn_cached!(self, aclnnSoftmax / aclnnSoftmaxGetWorkspaceSize, [self.tv(x)?] => [self.tv(&out)?],
            attrs [axis], |i, o| (i[0].ptr(), axis as i64, o[0].ptr()))?;
        let ov = self.tv(&out)?;
        let max = self.reduce(x, axis, ReduceOp::Max)?;
        let flag = self.alloc(numel(&max.shape), Dt::ACL_BOOL)?;
        let fv = self.cview(Mem { buf: &flag, offset: 0, dtype: Dt::ACL_BOOL }, &max.shape)?;
        aclnn_cached!(self, aclnnEqScalar / aclnnEqScalarGetWorkspaceSize, [self.tv(&max)?] => [fv],
            scalars [self.f32s(f32::NEG_INFINITY)?], attrs [], |i, o, s| (i[0].ptr(), s[0].ptr(), o[0].ptr()))?;
        let fv = self.cview(Mem { buf: &flag, offset: 0, dtype: Dt::ACL_BOOL }, &max.shape)?;
        let zero = self.f32s(0.0)?;
        aclnn!(
            self,
            aclnnInplaceMaskedFillScalar / aclnnInplaceMaskedFillScalarGetWorkspaceSize(ov.ptr(), fv.ptr(), zero.ptr())
        )?;
        Ok(out)
    }

    fn rms_norm(&self, x: &AscendTensor, weight: Option<&AscendTensor>, eps: f32) -> Result<AscendTensor> {
        checks::rms_norm(self.name(), &x.shape, weight.map(|w| &w.shape[..]))?;
        let d = x.shape[x.shape.len() - 1];
        let out = self.new_tensor(&x.shape)?;
        if numel(&x.shape) == 0 {
            return Ok(out);
        }
        let ones;
        let gamma = match weight {
            Some(w) => self.cview(self.tmem(w), &[d])?,
            None => {
                ones = self.full(&[d], 1.0)?;
                self.tv(&ones)?
            }
        };
        let mut rshape = x.shape.clone();
        *rshape.last_mut().expect("non-scalar") = 1;
        let rstd = self.new_tensor(&rshape)?;
        let (xv, ov, rv) = (self.tv(x)?, self.tv(&out)?, self.tv(&rstd)?);
        aclnn_cached!(self, aclnnRmsNorm / aclnnRmsNormGetWorkspaceSize, [xv, gamma] => [ov, rv],
            attrs [(eps as f64).to_bits()], |i, o| (i[0].ptr(), i[1].ptr(), eps as f64, o[0].ptr(), o[1].ptr()))?;
        Ok(out)
    }

    /// aclnnRotaryPositionEmbedding in interleave mode (mode 1, TND layout) on the trailing
    /// `rd` channels: cos/sin are widened to one value per channel with a stride-0 view, sin
    /// negated for the inverse rotation; the rotated slice is copied back into a copy of x.
    fn rope(&self, x: &AscendTensor, cos: &AscendTensor, sin: &AscendTensor, inverse: bool) -> Result<AscendTensor> {
        let (t, h, d, half) = checks::rope(self.name(), &x.shape, &cos.shape, &sin.shape)?;
        let rd = 2 * half;
        if numel(&x.shape) == 0 || rd == 0 {
            return self.gather_view(x, &x.shape, &strides(&x.shape), 0);
        }
        let out = self.gather_view(x, &x.shape, &strides(&x.shape), 0)?;
        let widen = |c: &AscendTensor, neg: bool| -> Result<AscendTensor> {
            let wide = self.gather_view(c, &[t, half, 2], &[half, 1, 0], 0)?;
            if !neg {
                return Ok(wide);
            }
            self.unary(&wide, UnaryOp::Neg)
        };
        let (c2, s2) = (widen(cos, false)?, widen(sin, inverse)?);
        let rot = self.new_tensor(&[t, h, rd])?;
        let xs = self.view(self.tmem(x), &[t, h, rd], &[h * d, d, 1], d - rd)?;
        let (cv, sv) = (self.cview(self.tmem(&c2), &[t, 1, rd])?, self.cview(self.tmem(&s2), &[t, 1, rd])?);
        let rv = self.tv(&rot)?;
        aclnn!(
            self,
            aclnnRotaryPositionEmbedding
                / aclnnRotaryPositionEmbeddingGetWorkspaceSize(
                    xs.ptr(),
                    cv.ptr(),
                    sv.ptr(),
                    sys::ACL_ROPE_MODE_INTERLEAVE,
                    rv.ptr()
                )
        )?;
        let dst = self.view(self.tmem(&out), &[t, h, rd], &[h * d, d, 1], d - rd)?;
        self.copy(&dst, &rv)?;
        Ok(out)
    }

    fn reshape(&self, x: &AscendTensor, shape: &[usize]) -> Result<AscendTensor> {
        checks::reshape(self.name(), &x.shape, shape)?;
        Ok(AscendTensor { buf: x.buf.clone(), shape: shape.to_vec(), offset: x.offset, bf16: x.bf16 })
    }

    fn transpose(&self, x: &AscendTensor, a: usize, b: usize) -> Result<AscendTensor> {
        checks::transpose(self.name(), &x.shape, a, b)?;
        let mut dims = x.shape.clone();
        let mut st = strides(&x.shape);
        dims.swap(a, b);
        st.swap(a, b);
        self.gather_view(x, &dims, &st, 0)
    }

    fn narrow(&self, x: &AscendTensor, axis: usize, start: usize, len: usize) -> Result<AscendTensor> {
        let dims = checks::narrow(self.name(), &x.shape, axis, start, len)?;
        let st = strides(&x.shape);
        if axis == 0 || x.shape[..axis].iter().all(|&d| d == 1) {
            // Contiguous slice: share the block.
            return Ok(AscendTensor {
                buf: x.buf.clone(),
                shape: dims,
                offset: x.offset + start * st[axis],
                bf16: x.bf16,
            });
        }
        self.gather_view(x, &dims, &st, start * st[axis])
    }

    fn concat(&self, xs: &[&AscendTensor], axis: usize) -> Result<AscendTensor> {
        let shape = checks::concat(self.name(), &xs.iter().map(|x| &x.shape[..]).collect::<Vec<_>>(), axis)?;
        let out = self.new_tensor(&shape)?;
        if numel(&shape) == 0 {
            return Ok(out);
        }
        let parts: Vec<&&AscendTensor> = xs.iter().filter(|x| numel(&x.shape) > 0).collect();
        let list = AclTensorList::new(self.api(), parts.iter().map(|x| self.tv(x)).collect::<Result<_>>()?)?;
        let ov = self.tv(&out)?;
        aclnn!(self, aclnnCat / aclnnCatGetWorkspaceSize(list.ptr(), axis as i64, ov.ptr()))?;
        Ok(out)
    }

    /// `-1` entries: the index is masked to 0 for aclnnIndexSelect, and their rows are
    /// zero-filled afterwards (`select_rows`).
    fn index_select(&self, x: &AscendTensor, idx: &AscendIndex) -> Result<AscendTensor> {
        let shape = checks::index_select(self.name(), &x.shape, &idx.shape, idx.bounds())?;
        let (rows, row) = (x.shape[0], x.shape[1..].iter().product());
        self.select_rows(self.tmem(x), rows, row, idx, &shape)
    }

    fn gather_last(&self, x: &AscendTensor, idx: &AscendIndex) -> Result<AscendTensor> {
        checks::gather_last(self.name(), &x.shape, &idx.shape, idx.bounds())?;
        let out = self.new_tensor(&idx.shape)?;
        if numel(&idx.shape) == 0 {
            return Ok(out);
        }
        let (xv, iv, ov) = (self.tv(x)?, self.iv(idx)?, self.tv(&out)?);
        aclnn_cached!(self, aclnnGather / aclnnGatherGetWorkspaceSize, [xv, iv] => [ov], attrs [-1],
            |i, o| (i[0].ptr(), -1, i[1].ptr(), o[0].ptr()))?;
        Ok(out)
    }

    fn index_add(&self, dst: &AscendTensor, idx: &AscendIndex, src: &AscendTensor) -> Result<AscendTensor> {
        checks::index_add(self.name(), &dst.shape, &idx.shape, &src.shape, idx.bounds())?;
        let n = numel(&idx.shape);
        let (rows, row) = (dst.shape[0], dst.shape[1..].iter().product::<usize>());
        let out = self.new_tensor(&dst.shape)?;
        if numel(&dst.shape) == 0 {
            return Ok(out);
        }
        if n * row == 0 {
            self.copy(&self.tv(&out)?, &self.tv(dst)?)?;
            return Ok(out);
        }
        let (dv, iv, sv, ov) = (
            self.cview(self.tmem(dst), &[rows, row])?,
            self.cview(self.imem(idx), &[n])?,
            self.cview(self.tmem(src), &[n, row])?,
            self.cview(self.tmem(&out), &[rows, row])?,
        );
        let one = self.f32s(1.0)?;
        aclnn!(
            self,
            aclnnIndexAdd / aclnnIndexAddGetWorkspaceSize(dv.ptr(), 0, iv.ptr(), sv.ptr(), one.ptr(), ov.ptr())
        )?;
        Ok(out)
    }

    fn topk(&self, x: &AscendTensor, k: usize) -> Result<(AscendTensor, AscendIndex)> {
        let shape = checks::topk(self.name(), &x.shape, k)?;
        let (vals, ids) = (self.new_tensor(&shape)?, self.new_index(&shape)?);
        if numel(&shape) == 0 {
            return Ok((vals, ids));
        }
        let ids64 = self.alloc(numel(&shape), Dt::ACL_INT64)?;
        let (xv, vv) = (self.tv(x)?, self.tv(&vals)?);
        let i64v = self.cview(Mem { buf: &ids64, offset: 0, dtype: Dt::ACL_INT64 }, &shape)?;
        aclnn_cached!(self, aclnnTopk / aclnnTopkGetWorkspaceSize, [xv] => [vv, i64v], attrs [k, -1, 1, 1],
            |i, o| (i[0].ptr(), k as i64, -1, true, true, o[0].ptr(), o[1].ptr()))?;
        let i64v = self.cview(Mem { buf: &ids64, offset: 0, dtype: Dt::ACL_INT64 }, &shape)?;
        aclnn_cached!(self, aclnnCast / aclnnCastGetWorkspaceSize, [i64v] => [self.iv(&ids)?], attrs [Dt::ACL_INT32.0],
            |i, o| (i[0].ptr(), Dt::ACL_INT32, o[0].ptr()))?;
        Ok((vals, ids))
    }

    fn index_mask(&self, idx: &AscendIndex) -> Result<AscendTensor> {
        checks::index_mask(self.name(), &idx.shape)?;
        let out = self.full(&idx.shape, 0.0)?;
        if numel(&idx.shape) == 0 {
            return Ok(out);
        }
        let neg = self.index_flag(idx, None)?;
        let (ov, nv) = (self.tv(&out)?, self.cview(Mem { buf: &neg, offset: 0, dtype: Dt::ACL_BOOL }, &idx.shape)?);
        let ninf = self.f32s(f32::NEG_INFINITY)?;
        aclnn!(
            self,
            aclnnInplaceMaskedFillScalar / aclnnInplaceMaskedFillScalarGetWorkspaceSize(ov.ptr(), nv.ptr(), ninf.ptr())
        )?;
        Ok(out)
    }

    fn concat_index(&self, xs: &[&AscendIndex], axis: usize) -> Result<AscendIndex> {
        let shape = checks::concat_index(self.name(), &xs.iter().map(|x| &x.shape[..]).collect::<Vec<_>>(), axis)?;
        let mut out = self.new_index(&shape)?;
        // The values on the host too, when every part's are known.
        if let Some(parts) = xs.iter().map(|x| x.host.clone()).collect::<Option<Vec<_>>>() {
            let outer: usize = shape[..axis].iter().product();
            let mut v = Vec::with_capacity(numel(&shape));
            for a in 0..outer {
                for (x, p) in xs.iter().zip(&parts) {
                    let chunk = numel(&x.shape[axis..]);
                    v.extend_from_slice(&p[a * chunk..(a + 1) * chunk]);
                }
            }
            out.host = Some(v.into());
        }
        if numel(&shape) == 0 {
            return Ok(out);
        }
        let parts: Vec<&&AscendIndex> = xs.iter().filter(|x| numel(&x.shape) > 0).collect();
        let list = AclTensorList::new(self.api(), parts.iter().map(|x| self.iv(x)).collect::<Result<_>>()?)?;
        let ov = self.iv(&out)?;
        aclnn!(self, aclnnCat / aclnnCatGetWorkspaceSize(list.ptr(), axis as i64, ov.ptr()))?;
        Ok(out)
    }

    fn offset_index(&self, idx: &AscendIndex, offset: i32) -> Result<AscendIndex> {
        // Host values only (no download): the device add wraps instead of faulting.
        checks::offset_index(self.name(), &idx.shape, offset, idx.bounds())?;
        let mut out = self.new_index(&idx.shape)?;
        out.host = idx.host.as_ref().map(|h| h.iter().map(|&v| if v == -1 { -1 } else { v + offset }).collect());
        if numel(&idx.shape) == 0 {
            return Ok(out);
        }
        let none = self.index_flag(idx, Some(-1))?;
        let (iv, ov) = (self.iv(idx)?, self.iv(&out)?);
        let (off, one) = (AclScalar::i32(self.api(), offset)?, AclScalar::i32(self.api(), 1)?);
        aclnn!(self, aclnnAdds / aclnnAddsGetWorkspaceSize(iv.ptr(), off.ptr(), one.ptr(), ov.ptr()))?;
        let (nv, minus) = (
            self.cview(Mem { buf: &none, offset: 0, dtype: Dt::ACL_BOOL }, &idx.shape)?,
            AclScalar::i32(self.api(), -1)?,
        );
        aclnn!(
            self,
            aclnnInplaceMaskedFillScalar
                / aclnnInplaceMaskedFillScalarGetWorkspaceSize(ov.ptr(), nv.ptr(), minus.ptr())
        )?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn moe_route(
        &self,
        logits: &AscendTensor,
        scoring: ScoringFunc,
        bias: Option<&AscendTensor>,
        hash_ids: Option<&AscendIndex>,
        k: usize,
        routed_scale: f32,
    ) -> Result<(AscendIndex, AscendTensor)> {
        let hash = hash_ids.map(|h| (&h.shape[..], h.bounds()));
        checks::moe_route(self.name(), &logits.shape, bias.map(|b| &b.shape[..]), hash, k)?;
        match self.route_fused(logits, scoring, bias, hash_ids, k, routed_scale)? {
            Some(r) => Ok(r),
            None => composed::moe_route(self, logits, scoring, bias, hash_ids, k, routed_scale),
        }
    }

    fn sparse_attention(
        &self,
        q: &AscendTensor,
        kv: &AscendPool,
        idx: &AscendIndex,
        sinks: &AscendTensor,
        scale: f32,
        act: Precision,
    ) -> Result<AscendTensor> {
        match self.sparse_attention_fused(q, kv, idx, sinks, scale, act)? {
            Some(out) => Ok(out),
            None => composed::sparse_attention(self, q, kv, idx, sinks, scale),
        }
    }

    fn compressor_step(
        &self,
        step: &dsv4_core::backend::CompressorStepOf<'_, Self>,
        carry: &mut AscendPool,
        act: Precision,
    ) -> Result<Option<AscendTensor>> {
        match self.compressor_step_fused(step, carry, act)? {
            Some(out) => Ok(out),
            None => composed::compressor_step(self, step, carry),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn indexer_select(
        &self,
        q: &AscendTensor,
        keys: &AscendPool,
        key_rows: &AscendIndex,
        weights: &AscendTensor,
        valid: &[std::ops::Range<usize>],
        k: usize,
        offset: i32,
        act: Precision,
    ) -> Result<AscendIndex> {
        match self.indexer_select_fused(q, keys, key_rows, weights, valid, k, offset, act)? {
            Some(out) => Ok(out),
            None => composed::indexer_select(
                self,
                q,
                keys,
                key_rows,
                weights,
                valid,
                k,
                offset,
                dsv4_core::backend::IndexScores::F32,
            ),
        }
    }

    fn moe_experts(
        &self,
        x: &AscendTensor,
        expert_ids: &[i32],
        weights: &AscendTensor,
        experts: &[ExpertWeights<AscendWeight>],
        limit: f32,
        act: Precision,
    ) -> Result<AscendTensor> {
        match self.experts_grouped(x, expert_ids, weights, experts, limit, act)? {
            Some(out) => Ok(out),
            None => composed::moe_experts(self, x, expert_ids, weights, experts, limit, act),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_exactness() {
        assert!(exact_in_bf16(&[1.0, -0.5, 448.0 * 2f32.powi(-7), 0.0]));
        assert!(!exact_in_bf16(&[1.0 + f32::EPSILON]));
    }

    #[test]
    fn probe_without_runtime_names_the_variable() {
        if std::env::var_os(sys::EMULATOR_VAR).is_some() || sys::load_runtime().is_ok() {
            return;
        }
        let e = probe().unwrap_err();
        assert!(e.contains("ASCEND_TOOLKIT_HOME"), "{e}");
    }
}
