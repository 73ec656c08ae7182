//! The collectives ranks use to exchange activations, as one trait over a backend's tensors so
//! that device implementations (HCCL, NCCL) work on device memory in stream order and the
//! in-process one ([`super::LocalComm`]) stages through the host.
//!
//! Semantics follow NCCL/HCCL (`HcclAllReduce`, `HcclAllGather`, `HcclReduceScatter`,
//! `HcclAlltoAllV`, `HcclBroadcast`; spec `ascend-api.md` §5): every rank of the communicator
//! calls the same collective in the same order with matching sizes; the result of a sum is the
//! same bits on every rank. A collective that cannot complete (a rank left, sizes disagree, the
//! wait timed out) returns [`Error::Comm`](crate::Error::Comm) on every rank that called it; it
//! never hangs past the communicator's timeout.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::error::Result;
use crate::parallel::dispatch::{self, DispatchArgs, Dispatched};

/// The collective operations, for error messages and traffic counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CollectiveKind {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAllV,
    Broadcast,
    Barrier,
    Split,
}

impl CollectiveKind {
    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::ReduceScatter => "reduce_scatter",
            CollectiveKind::AllToAllV => "all_to_all_v",
            CollectiveKind::Broadcast => "broadcast",
            CollectiveKind::Barrier => "barrier",
            CollectiveKind::Split => "split",
        }
    }
}

/// What one rank put into its communicator's collectives: calls and payload bytes per kind.
///
/// Payload bytes are the bytes this rank contributes, independent of the algorithm that moves
/// them: all-reduce and reduce-scatter count the whole input buffer, all-gather this rank's
/// part, all-to-all-v the rows sent to *other* ranks, broadcast the buffer on the root and 0
/// elsewhere. (A ring all-reduce puts `2·(n−1)/n` times its payload on the wire.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    pub by_kind: BTreeMap<CollectiveKind, (u64, u64)>,
}

impl Traffic {
    pub fn record(&mut self, kind: CollectiveKind, bytes: u64) {
        let e = self.by_kind.entry(kind).or_default();
        e.0 += 1;
        e.1 += bytes;
    }

    /// Payload bytes over every kind.
    pub fn bytes(&self) -> u64 {
        self.by_kind.values().map(|v| v.1).sum()
    }

    /// Calls over every kind except barriers and splits.
    pub fn calls(&self) -> u64 {
        self.by_kind
            .iter()
            .filter(|(k, _)| !matches!(k, CollectiveKind::Barrier | CollectiveKind::Split))
            .map(|(_, v)| v.0)
            .sum()
    }

    /// Adds `other`'s calls and bytes, kind by kind (a rank's several communicators).
    pub fn add(&mut self, other: &Traffic) {
        for (k, &(c, b)) in &other.by_kind {
            let e = self.by_kind.entry(*k).or_default();
            e.0 += c;
            e.1 += b;
        }
    }

    /// `self` repeated `n` times (the traffic of `n` steps of one step's).
    pub fn times(&self, n: u64) -> Traffic {
        Traffic { by_kind: self.by_kind.iter().map(|(&k, &(c, b))| (k, (c * n, b * n))).collect() }
    }

    /// `self − earlier`, kind by kind (for the traffic of one step).
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        let mut out = Traffic::default();
        for (k, &(c, b)) in &self.by_kind {
            let (c0, b0) = earlier.by_kind.get(k).copied().unwrap_or_default();
            if c > c0 {
                out.by_kind.insert(*k, (c - c0, b - b0));
            }
        }
        out
    }
}

/// A group of ranks that exchange `B`'s f32 activation tensors.
///
/// Every method is collective: each rank of the communicator calls it, in the same order.
pub trait Communicator<B: Backend>: Send + Sync {
    /// This rank's index in the communicator, `0..size()`.
    fn rank(&self) -> usize;
    /// Ranks in the communicator.
    fn size(&self) -> usize;

    /// Elementwise sum of `x` over the ranks (all shapes equal), the same bits on every rank.
    fn all_reduce_sum(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor>;

    /// The ranks' `x` concatenated along `dim` in rank order; the shapes must agree except in
    /// `dim`.
    fn all_gather(&self, be: &B, x: &B::Tensor, dim: usize) -> Result<B::Tensor>;

    /// The sum over ranks of `x` (all shapes equal, `dim`'s size a multiple of `size()`), of
    /// which rank r keeps part r of `dim` cut into `size()` equal parts.
    fn reduce_scatter_sum(&self, be: &B, x: &B::Tensor, dim: usize) -> Result<B::Tensor>;

    /// Rows to every rank: `x` is `[rows, ..]` with `send_rows[r]` consecutive rows for rank r
    /// (in rank order, summing to `rows`). Returns the rows received from every rank,
    /// concatenated in source-rank order, and how many came from each.
    fn all_to_all_v(&self, be: &B, x: &B::Tensor, send_rows: &[usize]) -> Result<(B::Tensor, Vec<usize>)>;

    /// `x` of rank `root` on every rank (the shapes must agree).
    fn broadcast(&self, be: &B, x: &B::Tensor, root: usize) -> Result<B::Tensor>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Collective: the ranks calling with the same `colour` form a new communicator, ordered
    /// by their rank here (`ncclCommSplit`, `HcclCreateSubCommConfig`).
    fn split(&self, colour: usize) -> Result<Box<dyn Communicator<B>>>;

    /// What this rank has put into this communicator so far.
    fn traffic(&self) -> Traffic;

    /// Expert-parallel dispatch ([`dispatch`](crate::parallel::dispatch)): this rank's tokens
    /// `args.x` `[BS, hidden]` with their routed experts and routing weights go to the ranks
    /// holding the experts. Returns the rows this rank's experts serve. Pair it with
    /// [`Self::moe_combine`]. Default: the all-to-all-v composition; a device communicator may
    /// use a fused kernel.
    fn moe_dispatch(&self, be: &B, args: &DispatchArgs<'_, B>) -> Result<Dispatched<B>> {
        dispatch::dispatch(self, be, args)
    }

    /// Expert-parallel combine: `outputs` `[R, hidden]`, the expert outputs of `d.rows`
    /// (weighted where `d.weights` is given), back to their tokens: `[BS, hidden]`, each
    /// token's sum over its experts (weighted here where `d.weights` is `None`).
    fn moe_combine(&self, be: &B, outputs: &B::Tensor, d: &Dispatched<B>) -> Result<B::Tensor> {
        dispatch::combine(self, be, outputs, d)
    }
}
