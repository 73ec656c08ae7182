//! Running one model over several devices (ranks): how the weights are split
//! ([`layout`]), how ranks exchange activations ([`comm`], with the in-process [`local`]
//! implementation that the CPU backend and CI use), and how each split weight is cut out of
//! the checkpoint ([`shard`]), and how the processes of a multi-node run find each other
//! ([`nodes`]), and HCCL rank-table files that describe such a world ([`rank_table`]).
//!
//! The split follows DeepSeek's own inference code (`inference/model.py`, spec §D):
//! - **expert parallelism (EP):** the routed experts of every MoE layer are cut into `ep`
//!   contiguous blocks, one per rank of an EP group; every rank routes all tokens, runs the
//!   experts it holds, and the group sums the results (`dist.all_reduce(y)`), after which each
//!   rank adds the (replicated) shared expert;
//! - **tensor parallelism (TP) of attention:** the query heads are split by output groups
//!   (`n_local_groups = o_groups / tp`): `wq_b`, `wo_a` and the sinks are cut by rows, `wo_b` by
//!   columns, and the group sums the partial `wo_b` outputs (`RowParallelLinear`). The shared
//!   K = V head, the compressors and the indexer are replicated (they are small, and the
//!   indexer's top-k needs every head's score);
//! - **vocabulary parallelism** of the embedding and the head over the TP group
//!   (`ParallelEmbedding`, `ParallelHead`): each rank holds a block of vocabulary rows, the
//!   embedding sums the group's lookups (only one rank holds a row, so the sum is exact) and the
//!   head gathers the group's logit columns.
//!
//! With [`MoeExchange::AllToAll`] an EP group instead splits the tokens among its ranks and
//! moves (token, expert) rows to the experts and back ([`dispatch`]), then all-gathers.
//!
//! Activations stay replicated between sub-layers, so every rank holds the whole residual
//! stream and its own copy of the decoding state. Except with data-parallel attention
//! ([`ParallelLayout::data_parallel_attention`]): each rank holds the whole attention and runs
//! sequences of its own, its own residual streams and decoding state, and the MoE dispatches
//! each rank's own tokens (no all-gather); a rank without tokens in a step joins the exchange
//! through [`crate::Model::idle_step`].

pub mod comm;
pub mod dispatch;
pub mod exchange;
pub mod layout;
pub mod local;
pub mod nodes;
pub mod plan;
pub mod rank;
pub mod rank_table;
pub mod run;
pub mod shard;

pub use comm::{CollectiveKind, Communicator, Traffic};
pub use layout::{MoeExchange, ParallelLayout, RankLayout};
pub use local::LocalComm;
pub use nodes::{NodeGroup, NodeSpec};
pub use rank::RankContext;
pub use rank_table::{RankTable, RankTableError};
pub use run::{panic_message, run_local, run_threads};
