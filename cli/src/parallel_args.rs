//! `--devices`, `--tensor-parallel` and `--expert-parallel`: running one model over several
//! ranks (crate `dsv4_core::parallel`).
//!
//! `--devices` takes a count (`4`) or device ids (`0-7`, `0,2,4,6`), as `vllm`'s
//! `CUDA_VISIBLE_DEVICES`-style lists and `dsv4 serve --devices 0-7` read. On the CPU backend the
//! ranks are threads of this process over the in-process communicator, which checks a layout's
//! numerics on any machine (it is not faster: the ranks share the cores). On Ascend the ranks
//! are threads of this process too, one per device, exchanging through HCCL
//! (`dsv4_backend_ascend::run_ranks`); CUDA ranks (NCCL) are not built yet.

use std::str::FromStr;

use anyhow::{bail, Result};
use dsv4_core::parallel::ParallelLayout;
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
    eprintln!("{}", ParallelArgs::describe(&layout, &cfg));
    Ok((cfg, ckpt, layout))
}

/// Device ids as AscendCL numbers them.
pub fn device_ids(devices: &DeviceList) -> Result<Vec<i32>> {
    devices.0.iter().map(|&d| i32::try_from(d).map_err(|_| anyhow::anyhow!("device id {d} is too large"))).collect()
}

/// `kv` with a decoding-state budget every rank resolves to the same pool: a share of the free
/// memory (a `--kv-cache-memory` fraction, or with `open_ended` chat's default of half the free
/// memory) becomes bytes once, here, divided among the ranks' pools, which share one machine's
/// memory on the CPU backend. Ranks whose pools differed would make different block decisions
/// and fall out of step. On Ascend every device has its own memory and the free memory a rank
/// sees depends on its part of the weights, so there a size in bytes is required.
pub fn fixed_kv_budget(kv: &KvArgs, world: usize, backend: BackendChoice, open_ended: bool) -> Result<KvArgs> {
    let shares_free =
        matches!(kv.kv_cache_memory, Some(MemorySize::Fraction(_))) || (open_ended && kv.kv_cache_memory.is_none());
    if !shares_free {
        return Ok(kv.clone());
    }
    match crate::resolve_backend(backend)? {
        crate::Resolved::Ascend => bail!(
            "with --devices on Ascend, give --kv-cache-memory as a size per device (e.g. 8GiB): every rank's pool must \
             be the same size, and a share of each device's free memory is not"
        ),
        crate::Resolved::Cuda => Err(crate::cuda_ranks_refused(world)),
        crate::Resolved::Cpu => {
            let free = crate::kv_args::free_memory(&dsv4_backend_cpu::CpuBackend::new())?;
            let total = match kv.kv_cache_memory {
                Some(m) => m.resolve(|| Ok(free))?,
                None => free / 2,
            };
            Ok(KvArgs { kv_cache_memory: Some(MemorySize::Bytes(total / world)), ..kv.clone() })
        }
    }
}

/// The parallel flags, flattened into the commands that run the model.
#[derive(clap::Args, Clone, Debug)]
pub struct ParallelArgs {
    /// Devices to split the model over, one rank each: a count (4) or device ids (0-7,
    /// 0,2,4,6). On the CPU backend, N ranks run as threads of this process over the in-process
    /// communicator (to check a layout's numerics; the ranks share the cores, so it is not
    /// faster); on Ascend, one thread per listed device over HCCL. CUDA ranks
    /// (NCCL) are not built yet.
    #[arg(long, value_name = "N|IDS", default_value = "1")]
    pub devices: DeviceList,
    /// Tensor-parallel degree of attention: ranks that split each layer's heads (by output
    /// group) and the vocabulary. Divides the number of devices; at most the model's o_groups.
    #[arg(long, value_name = "TP", default_value_t = 1)]
    pub tensor_parallel: usize,
    /// Expert-parallel degree: ranks that split each layer's routed experts. Divides the number
    /// of devices. Default: the number of devices (every rank holds 1/N of the experts).
    #[arg(long, value_name = "EP")]
    pub expert_parallel: Option<usize>,
}

impl ParallelArgs {
    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.devices.0.len()
    }

    /// The layout these flags ask for, checked against the model.
    pub fn layout(&self, cfg: &ModelConfig) -> Result<ParallelLayout> {
        let world = self.world();
        let ep = self.expert_parallel.unwrap_or(world);
        if self.expert_parallel.is_none() && ep > cfg.n_routed_experts {
            bail!(
                "--expert-parallel defaults to the number of devices ({world}), more than the model's {} routed \
                 experts: give --expert-parallel N with N dividing {world} and at most {}",
                cfg.n_routed_experts,
                cfg.n_routed_experts
            );
        }
        Ok(ParallelLayout::new(world, self.tensor_parallel, ep, cfg)?)
    }

    /// Whether the run uses more than one rank; refuses TP/EP flags on a single device.
    pub fn is_split(&self) -> Result<bool> {
        if self.world() == 1 && (self.tensor_parallel > 1 || self.expert_parallel.is_some_and(|e| e > 1)) {
            bail!("--tensor-parallel / --expert-parallel split the model over ranks: give --devices N (N > 1) as well");
        }
        Ok(self.world() > 1)
    }

    /// One line for stderr describing the layout.
    pub fn describe(layout: &ParallelLayout, cfg: &ModelConfig) -> String {
        let r0 = layout.rank(0);
        format!(
            "ranks: {}, threads of this process (CPU: over the in-process communicator; Ascend: one device each, over \
             HCCL); TP {} (rank 0: heads {:?} of {}, vocabulary rows {:?}), EP {} (rank 0: experts {:?} of {})",
            layout.world,
            layout.tp,
            r0.heads(cfg),
            cfg.num_heads,
            r0.vocab(cfg),
            layout.ep,
            r0.experts(cfg),
            cfg.n_routed_experts
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
