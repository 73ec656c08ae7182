//! Which rank holds which part of the model: the world is `tp × ep`-compatible (both divide
//! the number of ranks), TP groups are blocks of `tp` consecutive ranks, EP groups are the
//! ranks `world / ep` apart. With `tp = ep = world` this is exactly DeepSeek's inference layout
//! (every rank has `1/world` of the heads and of the experts); with `world = tp · ep` it is a
//! 2-D mesh (attention split inside a group of neighbours, experts across the groups).
//!
//! Splits are contiguous and as even as possible (the first `n % parts` parts hold one more),
//! so uneven counts (3 output groups on 2 ranks, 5 experts on 4) are allowed; a part may not
//! be empty.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The parallel degrees of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelLayout {
    /// Ranks (one per device).
    pub world: usize,
    /// Attention tensor-parallel degree (ranks that split the heads of one layer).
    pub tp: usize,
    /// Expert-parallel degree (ranks that split the routed experts of one layer).
    pub ep: usize,
    /// How an EP group exchanges the MoE's activations ([`MoeExchange`]).
    pub moe: MoeExchange,
    /// Data-parallel attention: each rank runs attention on sequences of its own (its own
    /// batch and decoding state) with the whole attention replicated (TP 1), and the MoE
    /// exchanges each rank's own tokens over the EP group by dispatch and combine
    /// ([`MoeExchange::AllToAll`], without the slicing and the all-gather). SGLang's
    /// `--enable-dp-attention`, DeepSeek's deployment of V3/V4 (DP attention + EP experts).
    /// Every rank of an EP group must step together: a rank with no tokens in a step takes
    /// part through [`crate::Model::idle_step`].
    pub data_parallel_attention: bool,
}

/// How the ranks of an EP group exchange the routed experts' activations.
///
/// Both give the same result up to the order of the f32 sums (conformance: 1e-5 relative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MoeExchange {
    /// DeepSeek's inference code (`MoE.forward`, spec §D): every rank routes every token, runs
    /// the (token, expert) pairs of the experts it holds, and the group sums the ranks' partial
    /// outputs with one all-reduce of `tokens × hidden`. (SGLang's `--moe-a2a-backend none`.)
    #[default]
    AllReduce,
    /// Token dispatch and combine ([`super::dispatch`]): each rank of the group takes a slice of
    /// the tokens, sends each (token, expert) pair to the rank holding the expert (all-to-all-v),
    /// gets the expert outputs back (all-to-all-v), sums them per token, and the group
    /// all-gathers the slices. The exchange Huawei's MC2 kernels
    /// (`aclnnMoeDistributeDispatchV2` / `CombineV2`) and DeepEP implement. Per rank it moves
    /// about `2·top_k·(ep−1)/ep² · tokens · hidden` values out and back plus the slices'
    /// all-gather (`(ep−1)/ep · tokens · hidden` on a ring), against the all-reduce's
    /// `2(ep−1)/ep · tokens · hidden`: more for V4's top_k while the tokens are replicated. It
    /// is the exchange data-parallel attention needs, where each rank's tokens are its own.
    AllToAll,
}

impl MoeExchange {
    /// The CLI's spelling (`--moe-exchange`).
    pub fn name(self) -> &'static str {
        match self {
            MoeExchange::AllReduce => "all-reduce",
            MoeExchange::AllToAll => "all-to-all",
        }
    }
}

impl ParallelLayout {
    /// One device: nothing is split.
    pub const SINGLE: ParallelLayout =
        ParallelLayout { world: 1, tp: 1, ep: 1, moe: MoeExchange::AllReduce, data_parallel_attention: false };

    /// Checks the degrees against each other and against the model: `tp` and `ep` divide
    /// `world`, `tp ≤ o_groups`, `ep ≤ n_routed_experts`.
    pub fn new(world: usize, tp: usize, ep: usize, cfg: &ModelConfig) -> Result<Self> {
        let bad = |field: &str, msg: String| Err(Error::config(field, msg));
        if world == 0 || tp == 0 || ep == 0 {
            return bad("devices", format!("world {world}, TP {tp} and EP {ep} must all be at least 1"));
        }
        if !world.is_multiple_of(tp) {
            return bad("tensor_parallel", format!("TP {tp} does not divide the {world} devices"));
        }
        if !world.is_multiple_of(ep) {
            return bad("expert_parallel", format!("EP {ep} does not divide the {world} devices"));
        }
        if tp > cfg.o_groups {
            return bad(
                "tensor_parallel",
                format!(
                    "TP {tp} is more than the model's {} attention output groups (heads are split by group)",
                    cfg.o_groups
                ),
            );
        }
        if ep > cfg.n_routed_experts {
            return bad(
                "expert_parallel",
                format!("EP {ep} is more than the model's {} routed experts", cfg.n_routed_experts),
            );
        }
        Ok(ParallelLayout { world, tp, ep, moe: MoeExchange::AllReduce, data_parallel_attention: false })
    }

    /// The same degrees with the MoE exchanged as `moe`.
    ///
    /// # Panics
    /// `MoeExchange::AllReduce` on a data-parallel attention layout: the all-reduce sums the
    /// ranks' outputs for the same tokens, and there each rank's tokens are its own.
    pub fn with_moe(self, moe: MoeExchange) -> Self {
        assert!(
            !(self.data_parallel_attention && moe == MoeExchange::AllReduce),
            "data-parallel attention exchanges the MoE by dispatch, not by all-reduce"
        );
        ParallelLayout { moe, ..self }
    }

    /// The same degrees with data-parallel attention (each rank its own sequences; the MoE
    /// exchanged by dispatch and combine). Needs TP 1 (attention is replicated, not split by
    /// heads) and an EP group (EP > 1: without one the ranks would share nothing, and
    /// separate processes serve that better).
    ///
    /// # Errors
    /// `Error::Config` naming `tensor_parallel` or `expert_parallel`.
    pub fn with_data_parallel_attention(self) -> Result<Self> {
        if self.tp > 1 {
            return Err(Error::config(
                "tensor_parallel",
                format!(
                    "data-parallel attention replicates attention on every rank, so it does not split heads: TP is {}, \
                     not 1",
                    self.tp
                ),
            ));
        }
        if self.ep == 1 {
            return Err(Error::config(
                "expert_parallel",
                "data-parallel attention exchanges each rank's tokens with the experts' ranks, but EP is 1 (every \
                 rank holds every expert, so the ranks would share nothing: separate processes serve that better)"
                    .to_string(),
            ));
        }
        Ok(ParallelLayout { moe: MoeExchange::AllToAll, data_parallel_attention: true, ..self })
    }

    /// Rank `rank`'s place in the layout.
    pub fn rank(&self, rank: usize) -> RankLayout {
        assert!(rank < self.world, "rank {rank} of a world of {}", self.world);
        let stride = self.world / self.ep;
        RankLayout { layout: *self, rank, tp_rank: rank % self.tp, ep_rank: rank / stride }
    }
}

/// One rank's coordinates and the parts of the model it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankLayout {
    pub layout: ParallelLayout,
    pub rank: usize,
    /// Position in its TP group (which heads and vocabulary rows it holds).
    pub tp_rank: usize,
    /// Position in its EP group (which experts it holds).
    pub ep_rank: usize,
}

impl RankLayout {
    /// The rank of a single-device run.
    pub const SINGLE: RankLayout = RankLayout { layout: ParallelLayout::SINGLE, rank: 0, tp_rank: 0, ep_rank: 0 };

    /// The TP group's colour (ranks with the same colour split attention together).
    pub fn tp_group(&self) -> usize {
        self.rank / self.layout.tp
    }

    /// The EP group's colour (ranks with the same colour split the experts together).
    pub fn ep_group(&self) -> usize {
        self.rank % (self.layout.world / self.layout.ep)
    }

    /// The attention output groups this rank computes (its heads are those groups' heads).
    pub fn groups(&self, cfg: &ModelConfig) -> Range<usize> {
        split(cfg.o_groups, self.layout.tp, self.tp_rank)
    }

    /// The query heads this rank computes: whole output groups.
    pub fn heads(&self, cfg: &ModelConfig) -> Range<usize> {
        let per_group = cfg.num_heads / cfg.o_groups;
        let g = self.groups(cfg);
        g.start * per_group..g.end * per_group
    }

    /// The routed experts this rank holds (ids into the layer's experts).
    pub fn experts(&self, cfg: &ModelConfig) -> Range<usize> {
        split(cfg.n_routed_experts, self.layout.ep, self.ep_rank)
    }

    /// The vocabulary rows of the embedding and the head this rank holds.
    pub fn vocab(&self, cfg: &ModelConfig) -> Range<usize> {
        split(cfg.vocab_size, self.layout.tp, self.tp_rank)
    }

    pub fn is_single(&self) -> bool {
        self.layout.world == 1
    }

    /// The data-parallel attention rank: which of the run's sequence groups this rank serves
    /// (its world rank under [`ParallelLayout::data_parallel_attention`]; 0 otherwise, where
    /// every rank computes every sequence).
    pub fn dp_rank(&self) -> usize {
        if self.layout.data_parallel_attention {
            self.rank
        } else {
            0
        }
    }
}

/// Part `i` of `n` items cut into `parts` contiguous parts whose sizes differ by at most one
/// (the first `n % parts` parts are the larger).
pub fn split(n: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (n / parts, n % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_item_once_with_sizes_within_one() {
        for n in 1..40 {
            for parts in 1..=n.min(9) {
                let ranges: Vec<_> = (0..parts).map(|i| split(n, parts, i)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, n);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let (lo, hi) = (ranges.iter().map(|r| r.len()).min(), ranges.iter().map(|r| r.len()).max());
                assert!(lo.unwrap() >= 1 && hi.unwrap() - lo.unwrap() <= 1, "n {n} parts {parts}: {ranges:?}");
            }
        }
        assert_eq!(split(5, 2, 0), 0..3);
        assert_eq!(split(5, 2, 1), 3..5);
    }

    fn cfg() -> ModelConfig {
        let mut c = crate::builtin::tiny().unwrap().0;
        c.o_groups = 4;
        c.num_heads = 8;
        c.n_routed_experts = 8;
        c
    }

    #[test]
    fn mesh_groups_partition_the_world() {
        let c = cfg();
        // 2 × 2 mesh: TP groups {0,1},{2,3}; EP groups {0,2},{1,3}.
        let l = ParallelLayout::new(4, 2, 2, &c).unwrap();
        let r: Vec<RankLayout> = (0..4).map(|i| l.rank(i)).collect();
        assert_eq!(r.iter().map(|x| x.tp_group()).collect::<Vec<_>>(), [0, 0, 1, 1]);
        assert_eq!(r.iter().map(|x| x.ep_group()).collect::<Vec<_>>(), [0, 1, 0, 1]);
        assert_eq!(r.iter().map(|x| x.tp_rank).collect::<Vec<_>>(), [0, 1, 0, 1]);
        assert_eq!(r.iter().map(|x| x.ep_rank).collect::<Vec<_>>(), [0, 0, 1, 1]);
        // Every EP group holds every expert once, every TP group every head once.
        for colour in 0..2 {
            let mut experts: Vec<usize> =
                r.iter().filter(|x| x.ep_group() == colour).flat_map(|x| x.experts(&c)).collect();
            experts.sort();
            assert_eq!(experts, (0..8).collect::<Vec<_>>());
            let mut heads: Vec<usize> = r.iter().filter(|x| x.tp_group() == colour).flat_map(|x| x.heads(&c)).collect();
            heads.sort();
            assert_eq!(heads, (0..8).collect::<Vec<_>>());
        }
        // DeepSeek's layout: both over the whole world.
        let l = ParallelLayout::new(4, 4, 4, &c).unwrap();
        for i in 0..4 {
            let x = l.rank(i);
            assert_eq!((x.tp_group(), x.ep_group(), x.tp_rank, x.ep_rank), (0, 0, i, i));
            assert_eq!(x.experts(&c), 2 * i..2 * i + 2);
            assert_eq!(x.heads(&c), 2 * i..2 * i + 2);
        }
    }

    #[test]
    fn data_parallel_attention_needs_one_head_split_and_an_expert_split() {
        let c = cfg();
        let dp = ParallelLayout::new(4, 1, 4, &c).unwrap().with_data_parallel_attention().unwrap();
        assert!(dp.data_parallel_attention);
        assert_eq!(dp.moe, MoeExchange::AllToAll);
        assert_eq!((0..4).map(|r| dp.rank(r).dp_rank()).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(ParallelLayout::new(4, 1, 4, &c).unwrap().rank(3).dp_rank(), 0);
        for (w, tp, ep, field) in [(4, 2, 2, "tensor_parallel"), (2, 1, 1, "expert_parallel")] {
            let e = ParallelLayout::new(w, tp, ep, &c).unwrap().with_data_parallel_attention().unwrap_err();
            assert!(matches!(&e, Error::Config { field: f, .. } if f == field), "{w} {tp} {ep}: {e}");
        }
    }

    #[test]
    fn impossible_layouts_are_refused_by_name() {
        let c = cfg();
        for (w, tp, ep, field) in [
            (4, 3, 1, "tensor_parallel"),
            (4, 1, 3, "expert_parallel"),
            (8, 8, 1, "tensor_parallel"),
            (16, 1, 16, "expert_parallel"),
            (0, 1, 1, "devices"),
        ] {
            let e = ParallelLayout::new(w, tp, ep, &c).unwrap_err();
            assert!(matches!(&e, Error::Config { field: f, .. } if f == field), "{w} {tp} {ep}: {e}");
        }
    }
}
