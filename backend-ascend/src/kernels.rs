//! Which of Huawei's fused kernels this device uses instead of dsv4's compositions of
//! primitives. A kernel is used when three things hold: the SoC family supports it (from the
//! CANN operator docs), the loaded op libraries export every symbol it needs (older CANN
//! releases lack newer ops), and the policy (`DSV4_ASCEND_FUSED`) allows it. Everything else
//! falls back to the composition, which computes the same thing with more launches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use dsv4_ascend_sys as sys;
use dsv4_core::error::Result;

use crate::acl::err;

/// The variable that turns fused kernels off (`off`), on where supported except the opt-in
/// ones (`auto`, default), or on including the opt-in ones (`all`).
pub const FUSED_VAR: &str = "DSV4_ASCEND_FUSED";

/// Whether fused kernels may be used at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedPolicy {
    /// Every fused kernel the SoC and the libraries support, except the opt-in ones.
    Auto,
    /// Also the opt-in kernels ([`KernelSpec::opt_in`]).
    All,
    /// Compositions of primitives only (to bisect a suspected kernel problem).
    Off,
}

impl FusedPolicy {
    /// From `DSV4_ASCEND_FUSED` (`auto` when unset).
    pub fn from_env() -> Result<Self> {
        let value = std::env::var(FUSED_VAR).ok();
        match value.as_deref().map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("auto") => Ok(FusedPolicy::Auto),
            Some("all") => Ok(FusedPolicy::All),
            Some("off") => Ok(FusedPolicy::Off),
            _ => Err(err(format!(
                "{FUSED_VAR}={:?} is not understood; use `auto`, `all` or `off`",
                value.unwrap_or_default()
            ))),
        }
    }
}

/// SoC families that differ in what the CANN operators support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocFamily {
    /// Atlas A2 training/inference (Ascend910B1..B4).
    AtlasA2,
    /// Atlas A3 (Ascend910_93xx, "910C").
    AtlasA3,
    /// Ascend 950PR / 950DT.
    Ascend950,
    /// Atlas inference series (Ascend310P): no BF16, few transformer kernels.
    Atlas310P,
    /// Atlas training series, the first 910 generation (Ascend910A, 910ProA, 910ProB,
    /// 910PremiumA): no BF16, few transformer kernels.
    Atlas910A,
    /// Anything else (310B, unknown names): no fused kernels assumed.
    Other,
}

impl SocFamily {
    /// From `aclrtGetSocName` (`Ascend910B3`, `Ascend910_9391`, `Ascend950PR_9599`, `Ascend310P3`).
    pub fn of(soc: &str) -> SocFamily {
        if soc.starts_with("Ascend910B") {
            SocFamily::AtlasA2
        } else if soc.starts_with("Ascend910_93") {
            SocFamily::AtlasA3
        } else if soc.starts_with("Ascend950") {
            SocFamily::Ascend950
        } else if soc.starts_with("Ascend310P") {
            SocFamily::Atlas310P
        } else if ["Ascend910A", "Ascend910ProA", "Ascend910ProB", "Ascend910PremiumA"]
            .iter()
            .any(|p| soc.starts_with(p))
        {
            SocFamily::Atlas910A
        } else {
            SocFamily::Other
        }
    }
}

/// One fused kernel dsv4 knows how to use.
pub struct KernelSpec {
    /// What it replaces, as `dsv4 devices` prints it.
    pub name: &'static str,
    /// Every symbol the override calls beyond the primitives'.
    pub symbols: &'static [&'static str],
    pub families: &'static [SocFamily],
    /// Used only with `DSV4_ASCEND_FUSED=all`: the V4 attention kernels, whose argument lists
    /// differ between ops-transformer releases under the same symbol names (a 34-argument
    /// aclnnSparseFlashMla with KV strides, a 26-argument experimental aclnnLightningIndexerV2,
    /// revisions that ignore oriSparseIndices), so a symbol lookup cannot tell whether the call
    /// dsv4 makes is the one the library implements; a wrong argument list is undefined
    /// behaviour, which no self-test can catch. Emulator-verified against the revision
    /// `dsv4_ascend.h` names, not yet run on hardware.
    pub opt_in: bool,
}

/// `aclnnGroupedMatmulV4` for the routed experts: one launch per projection for all experts.
pub const GROUPED_MATMUL: KernelSpec = KernelSpec {
    name: "moe_experts: aclnnGroupedMatmulV4",
    symbols: &["aclnnGroupedMatmulV4GetWorkspaceSize", "aclnnGroupedMatmulV4"],
    families: &[SocFamily::AtlasA2, SocFamily::AtlasA3, SocFamily::Ascend950],
    opt_in: false,
};

/// The same kernel's BF16 form in `--precision bf16`: BF16 x, a list of BF16 weights (quantised
/// FP4 experts dequantised to BF16 exactly), BF16 out; its own switch, so that a release that
/// rejects it keeps the FLOAT32 form.
pub const GROUPED_MATMUL_BF16: KernelSpec = KernelSpec {
    name: "moe_experts (bf16, BF16 weight list): aclnnGroupedMatmulV4",
    symbols: &["aclnnGroupedMatmulV4GetWorkspaceSize", "aclnnGroupedMatmulV4"],
    families: &[SocFamily::AtlasA2, SocFamily::AtlasA3, SocFamily::Ascend950],
    opt_in: false,
};

/// `aclnnMatmul` / `aclnnBatchMatMul` on BF16 operands for `linear_act` / `grouped_linear_act`
/// where the precision rounds to BF16: the projections at a rounding point (attention, indexer,
/// shared expert, MTP) read their BF16 weights as stored
/// (quantised weights dequantised to BF16 exactly) instead of a per-call F32 copy, and the
/// output is rounded to BF16 once. Not a fused kernel, but the same switch and self-test:
/// BF16 matmuls are documented for Atlas A2/A3 and the 950 only (`aclnnMatmul.md`).
pub const LINEAR_BF16: KernelSpec = KernelSpec {
    name: "linear_act (bf16/official): aclnnMatmul / aclnnBatchMatMul in BF16",
    symbols: &["aclnnMatmulGetWorkspaceSize", "aclnnMatmul", "aclnnBatchMatMulGetWorkspaceSize", "aclnnBatchMatMul"],
    families: &[SocFamily::AtlasA2, SocFamily::AtlasA3, SocFamily::Ascend950],
    opt_in: false,
};

/// `aclnnWeightQuantBatchMatmulV2` for `linear_act` in bf16/official on a weight kept with group
/// scales, multiplied as kept instead of dequantised into a BF16 temporary per call
/// (`aclnnWeightQuantBatchMatmulV2.md`, hicann/ops-nn): the FP4 experts' INT8 form per-group
/// (BF16 antiquant scales, group in [32, K−1]) on Atlas A2/A3 and the 950, MXFP4 in MX mode
/// (FLOAT8_E8M0 scales per 32) on the 950. FP8 blocks are no form it takes (A16W8 FP8 is
/// per-channel only), so they keep the BF16 matmul on a dequantised copy.
pub const WEIGHT_QUANT_MATMUL: KernelSpec = KernelSpec {
    name: "linear_act (bf16, INT8/MXFP4 weight): aclnnWeightQuantBatchMatmulV2",
    symbols: &["aclnnWeightQuantBatchMatmulV2GetWorkspaceSize", "aclnnWeightQuantBatchMatmulV2"],
    families: &[SocFamily::AtlasA2, SocFamily::AtlasA3, SocFamily::Ascend950],
    opt_in: false,
};

/// On the 950, FP8 weights with E8M0 block scales and MXFP4 weights kept as stored
/// (`dsv4_core::weight_forms::checkpoint_form`), widened by aclnnCast of their codes (the
/// 950's conversion table in `aclnnCast.md`). Not a fused kernel: listed for its switch and
/// its self-test at open, which widens a weight of every FP8 code and one of every FP4 code
/// pair on the device and compares with the host's dequantisation value for value (no doc
/// states the nibble order of FLOAT4_E2M1). Off: the Atlas A2/A3 forms (FP8 as BF16, FP4 as
/// INT8 + BF16 scales), which `dsv4 plan --soc 950` does not count.
pub const NATIVE_LOW_BIT_WEIGHTS: KernelSpec = KernelSpec {
    name: "weights: FP8 blocks and MXFP4 kept as stored (aclnnCast)",
    symbols: &["aclnnCastGetWorkspaceSize", "aclnnCast"],
    families: &[SocFamily::Ascend950],
    opt_in: false,
};

/// `aclnnMoeGatingTopKV2` for routing with sigmoid or softmax scores (normType 1 / 0).
pub const MOE_GATING: KernelSpec = KernelSpec {
    name: "moe_route (sigmoid/softmax scores): aclnnMoeGatingTopKV2",
    symbols: &["aclnnMoeGatingTopKV2GetWorkspaceSize", "aclnnMoeGatingTopKV2"],
    families: &[SocFamily::AtlasA2, SocFamily::AtlasA3, SocFamily::Ascend950],
    opt_in: false,
};

/// The same kernel with V4's sqrt(softplus) scores (normType 2), which the docs give for the
/// 950 only; A2/A3 compose Softplus, Sqrt, TopK and Gather instead.
pub const MOE_GATING_SQRT_SOFTPLUS: KernelSpec = KernelSpec {
    name: "moe_route (sqrt-softplus scores, V4): aclnnMoeGatingTopKV2",
    symbols: &["aclnnMoeGatingTopKV2GetWorkspaceSize", "aclnnMoeGatingTopKV2"],
    families: &[SocFamily::Ascend950],
    opt_in: false,
};

/// `aclnnSparseFlashMla` (with its AICPU pre-pass `aclnnSparseFlashMlaMetadata`) for
/// `sparse_attention` in bf16 / official: V4's shared-KV attention with sinks over an explicit
/// key set per query (the "SWA sparse ori_kv" scenario), BF16 q and KV rows, D = 512.
pub const SPARSE_FLASH_MLA: KernelSpec = KernelSpec {
    name: "sparse_attention (bf16/official, D = 512): aclnnSparseFlashMla",
    symbols: &[
        "aclnnSparseFlashMlaMetadataGetWorkspaceSize",
        "aclnnSparseFlashMlaMetadata",
        "aclnnSparseFlashMlaGetWorkspaceSize",
        "aclnnSparseFlashMla",
    ],
    families: &[SocFamily::AtlasA2, SocFamily::AtlasA3, SocFamily::Ascend950],
    opt_in: true,
};

/// `aclnnLightningIndexerV2` for `indexer_select` in bf16: the indexer's scores and top-k in
/// one launch, BF16 q and keys, indexer head dim 128.
pub const LIGHTNING_INDEXER: KernelSpec = KernelSpec {
    name: "indexer_select (bf16, index head dim 128): aclnnLightningIndexerV2",
    // The 950 requires the metadata pre-pass (A2/A3 do not call it); it is listed for every
    // SoC, so an install without it composes rather than failing its first call.
    symbols: &[
        "aclnnLightningIndexerV2MetadataGetWorkspaceSize",
        "aclnnLightningIndexerV2Metadata",
        "aclnnLightningIndexerV2GetWorkspaceSize",
        "aclnnLightningIndexerV2",
    ],
    families: &[SocFamily::AtlasA2, SocFamily::AtlasA3, SocFamily::Ascend950],
    opt_in: true,
};

/// `aclnnCompressor` for `compressor_step` in bf16/official: a compressor's two projections,
/// position bias, state update and window pooling in one launch, BF16 tokens and weights,
/// hidden size 1024..=10240 (a multiple of 512), and only the three V4 shapes (CSA attention
/// D = 512 and indexer D = 128 with overlapping windows of 4, HCA D = 512 windows of 128).
/// Atlas A3 and the 950 (`aclnnCompressor.md` lists Atlas A2 as unsupported).
pub const COMPRESSOR: KernelSpec = KernelSpec {
    name: "compressor_step (bf16/official, H 1K..10K): aclnnCompressor",
    symbols: &["aclnnCompressorGetWorkspaceSize", "aclnnCompressor"],
    families: &[SocFamily::AtlasA3, SocFamily::Ascend950],
    opt_in: true,
};

/// Huawei's MC2 `aclnnMoeDistributeDispatchV2` / `aclnnMoeDistributeCombineV2` for the
/// expert-parallel exchange (`--moe-exchange all-to-all`) in bf16/official: the rows go to the
/// experts' ranks and back in two launches on the EP communicator, BF16, hidden size
/// 1024..=8192, at most 512 tokens per rank. Atlas A3 only here (A2's needs EP ≥ 16 and other
/// layouts; the 950 is not supported by the docs). On A3 the routing weights are applied at the
/// combine, after `w2`. Self-tested on its first use by every rank of the group together.
pub const MOE_DISTRIBUTE: KernelSpec = KernelSpec {
    name: "moe_dispatch (bf16): aclnnMoeDistributeDispatchV2 + CombineV2",
    symbols: &[
        "aclnnMoeDistributeDispatchV2GetWorkspaceSize",
        "aclnnMoeDistributeDispatchV2",
        "aclnnMoeDistributeCombineV2GetWorkspaceSize",
        "aclnnMoeDistributeCombineV2",
    ],
    families: &[SocFamily::AtlasA3],
    opt_in: true,
};

pub const ALL: &[&KernelSpec] = &[
    &GROUPED_MATMUL,
    &GROUPED_MATMUL_BF16,
    &LINEAR_BF16,
    &WEIGHT_QUANT_MATMUL,
    &NATIVE_LOW_BIT_WEIGHTS,
    &MOE_GATING,
    &MOE_GATING_SQRT_SOFTPLUS,
    &SPARSE_FLASH_MLA,
    &LIGHTNING_INDEXER,
    &COMPRESSOR,
    &MOE_DISTRIBUTE,
];

/// The decision for one kernel, with the reason when it is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub name: &'static str,
    pub used: bool,
    pub why: String,
}

/// Decides one kernel for a SoC, given which symbols the loaded libraries export.
pub fn choose(k: &KernelSpec, soc: &str, policy: FusedPolicy, has: impl Fn(&str) -> bool) -> Choice {
    let family = SocFamily::of(soc);
    let (used, why) = if policy == FusedPolicy::Off {
        (false, format!("off ({FUSED_VAR}=off)"))
    } else if !k.families.contains(&family) {
        (false, format!("not supported on {soc}"))
    } else if k.opt_in && policy != FusedPolicy::All {
        (
            false,
            format!(
                "opt-in ({FUSED_VAR}=all): emulator-verified only, and its argument list differs between \
                 ops-transformer releases"
            ),
        )
    } else if let Some(missing) = k.symbols.iter().find(|s| !has(s)) {
        (false, format!("{missing} not found in the loaded op libraries"))
    } else {
        (true, "used".to_string())
    };
    Choice { name: k.name, used, why }
}

/// Whether one kernel is in use, which can change once: a kernel that fails its self-test at
/// open or an operator call at run time is switched off for good, with the reason.
#[derive(Debug)]
pub struct KernelState {
    name: &'static str,
    used: AtomicBool,
    why: Mutex<String>,
}

impl KernelState {
    fn new(c: &Choice) -> KernelState {
        KernelState { name: c.name, used: AtomicBool::new(c.used), why: Mutex::new(c.why.clone()) }
    }

    /// What it replaces and with which kernel (`moe_experts: aclnnGroupedMatmulV4`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn usable(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    pub fn disable(&self, why: String) {
        self.used.store(false, Ordering::Relaxed);
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Why it is not in use (or "used").
    pub fn why(&self) -> String {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn choice(&self) -> Choice {
        Choice { name: self.name, used: self.usable(), why: self.why.lock().unwrap_or_else(|p| p.into_inner()).clone() }
    }
}

/// The kernels this backend uses.
#[derive(Debug)]
pub struct Kernels {
    pub grouped_matmul: KernelState,
    pub grouped_matmul_bf16: KernelState,
    pub linear_bf16: KernelState,
    pub weight_quant_matmul: KernelState,
    pub native_weights: KernelState,
    pub gating: KernelState,
    pub gating_sqrt_softplus: KernelState,
    pub sparse_flash_mla: KernelState,
    pub lightning_indexer: KernelState,
    pub compressor: KernelState,
    pub moe_distribute: KernelState,
}

impl Kernels {
    pub fn select(api: &sys::Api, soc: &str, policy: FusedPolicy) -> Kernels {
        Kernels::from_choices(|k| choose(k, soc, policy, |s| api.has(s)))
    }

    /// Every kernel's state from its decision.
    fn from_choices(decide: impl Fn(&KernelSpec) -> Choice) -> Kernels {
        let state = |k: &KernelSpec| KernelState::new(&decide(k));
        Kernels {
            grouped_matmul: state(&GROUPED_MATMUL),
            grouped_matmul_bf16: state(&GROUPED_MATMUL_BF16),
            linear_bf16: state(&LINEAR_BF16),
            weight_quant_matmul: state(&WEIGHT_QUANT_MATMUL),
            native_weights: state(&NATIVE_LOW_BIT_WEIGHTS),
            gating: state(&MOE_GATING),
            gating_sqrt_softplus: state(&MOE_GATING_SQRT_SOFTPLUS),
            sparse_flash_mla: state(&SPARSE_FLASH_MLA),
            lightning_indexer: state(&LIGHTNING_INDEXER),
            compressor: state(&COMPRESSOR),
            moe_distribute: state(&MOE_DISTRIBUTE),
        }
    }

    /// Switches off every kernel whose name contains `which` (e.g. `aclnnSparseFlashMla`);
    /// returns how many.
    pub fn switch_off(&self, which: &str) -> usize {
        let hit: Vec<_> = self.all().into_iter().filter(|k| k.name.contains(which)).collect();
        for k in &hit {
            k.disable("switched off by the caller".into());
        }
        hit.len()
    }

    /// Every kernel's current decision, in the order of [`ALL`].
    pub fn choices(&self) -> Vec<Choice> {
        self.all().iter().map(|k| k.choice()).collect()
    }

    /// Every kernel's state, in the order of [`ALL`].
    fn all(&self) -> [&KernelState; 11] {
        [
            &self.grouped_matmul,
            &self.grouped_matmul_bf16,
            &self.linear_bf16,
            &self.weight_quant_matmul,
            &self.native_weights,
            &self.gating,
            &self.gating_sqrt_softplus,
            &self.sparse_flash_mla,
            &self.lightning_indexer,
            &self.compressor,
            &self.moe_distribute,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soc_names_map_to_families() {
        assert_eq!(SocFamily::of("Ascend910B3"), SocFamily::AtlasA2);
        assert_eq!(SocFamily::of("Ascend910_9391"), SocFamily::AtlasA3);
        assert_eq!(SocFamily::of("Ascend950PR_9599"), SocFamily::Ascend950);
        assert_eq!(SocFamily::of("Ascend310P3"), SocFamily::Atlas310P);
        for soc in ["Ascend910A", "Ascend910ProA", "Ascend910ProB", "Ascend910PremiumA"] {
            assert_eq!(SocFamily::of(soc), SocFamily::Atlas910A, "{soc}");
        }
        assert_eq!(SocFamily::of("Ascend910B4"), SocFamily::AtlasA2);
        assert_eq!(SocFamily::of("Ascend310B1"), SocFamily::Other);
    }

    /// `Kernels::all` (hand-kept) lists every kernel of [`ALL`], in its order.
    #[test]
    fn every_kernel_has_a_state_in_the_order_of_all() {
        let kernels = Kernels::from_choices(|k| choose(k, "Ascend910B3", FusedPolicy::Auto, |_| true));
        let names: Vec<&str> = kernels.choices().iter().map(|c| c.name).collect();
        assert_eq!(names, ALL.iter().map(|k| k.name).collect::<Vec<_>>());
    }

    #[test]
    fn a_kernel_needs_the_soc_the_symbols_and_the_policy() {
        let all = |_: &str| true;
        assert!(choose(&GROUPED_MATMUL, "Ascend910B3", FusedPolicy::Auto, all).used);
        let off = choose(&GROUPED_MATMUL, "Ascend910B3", FusedPolicy::Off, all);
        assert!(!off.used && off.why.contains("DSV4_ASCEND_FUSED=off"), "{off:?}");
        let soc = choose(&GROUPED_MATMUL, "Ascend310P3", FusedPolicy::Auto, all);
        assert!(!soc.used && soc.why.contains("Ascend310P3"), "{soc:?}");
        assert!(!choose(&MOE_GATING_SQRT_SOFTPLUS, "Ascend910_9391", FusedPolicy::Auto, all).used);
        assert!(choose(&MOE_GATING_SQRT_SOFTPLUS, "Ascend950PR_9599", FusedPolicy::Auto, all).used);
        assert!(choose(&MOE_GATING, "Ascend910B4", FusedPolicy::Auto, all).used);
        let old = choose(&GROUPED_MATMUL, "Ascend910_9391", FusedPolicy::Auto, |s| !s.starts_with("aclnnGrouped"));
        assert!(!old.used && old.why.contains("aclnnGroupedMatmulV4GetWorkspaceSize"), "{old:?}");
    }
}
