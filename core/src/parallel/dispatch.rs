//! Expert-parallel token dispatch and combine ([`super::MoeExchange::AllToAll`]): the rows of
//! an EP group's tokens go to the ranks holding their experts and the experts' outputs come
//! back, as DeepEP and Huawei's MC2 kernels (`aclnnMoeDistributeDispatchV2` /
//! `aclnnMoeDistributeCombineV2`, ops-transformer `mc2/`) do it.
//!
//! A rank calls [`Communicator::moe_dispatch`] with its own tokens `[BS, hidden]`, their
//! routed experts (`[BS, top_k]` global ids) and routing weights, runs its experts on the
//! [`Dispatched`] rows it receives (each row one (token, expert) pair of some rank), and calls
//! [`Communicator::moe_combine`] with their outputs; it gets back, for each of its tokens, the
//! sum over its `top_k` experts. The routing weight travels with the row and is applied by
//! the expert before `w2`, as V4's `Expert.forward` does (spec §B.5), so combine only sums.
//!
//! The composition here ([`dispatch`], [`combine`]) is the definition: three all-to-all-v
//! calls (the rows `[P, hidden]` and their (weight, expert) `[P, 2]` out, the outputs back)
//! and host arithmetic on the counts ([`DispatchPlan`]). A device communicator may override
//! the two trait methods with fused kernels that compute the same sums.

use std::any::Any;
use std::ops::Range;

use crate::backend::{Backend, DeviceTensor};
use crate::error::{Error, Result};
use crate::parallel::Communicator;
use crate::precision::Precision;

/// Where this rank's (token, expert) pairs go: host arithmetic shared by every implementation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// The pairs in send order (grouped by destination rank, in slot order within a rank):
    /// each one's slot `token · top_k + k` into the ids.
    pub slots: Vec<usize>,
    /// Pairs sent to each rank of the group (`size` entries, summing to `slots.len()`).
    pub send_rows: Vec<usize>,
    /// Each sent pair's expert as an index into its destination rank's experts.
    pub local_ids: Vec<i32>,
}

impl DispatchPlan {
    /// The plan for `ids` (`[BS · top_k]` global expert ids, row-major) over a group whose rank
    /// `r` holds the experts `held[r]` (contiguous, in rank order, covering `0..experts`).
    ///
    /// # Errors
    /// An id that no rank holds.
    pub fn new(ids: &[i32], held: &[Range<usize>]) -> Result<DispatchPlan> {
        let mut by_rank: Vec<Vec<usize>> = vec![Vec::new(); held.len()];
        let mut local = vec![0i32; ids.len()];
        for (slot, &id) in ids.iter().enumerate() {
            let owner = usize::try_from(id).ok().and_then(|e| held.iter().position(|h| h.contains(&e)));
            let Some(owner) = owner else {
                let all = held.last().map_or(0, |h| h.end);
                return Err(Error::Input(format!("moe_dispatch: expert id {id} is outside 0..{all}")));
            };
            by_rank[owner].push(slot);
            local[slot] = id - held[owner].start as i32;
        }
        let send_rows = by_rank.iter().map(Vec::len).collect();
        let slots: Vec<usize> = by_rank.into_iter().flatten().collect();
        let local_ids = slots.iter().map(|&s| local[s]).collect();
        Ok(DispatchPlan { slots, send_rows, local_ids })
    }
}

/// One rank's part of a dispatch ([`Communicator::moe_dispatch`]).
pub struct DispatchArgs<'a, B: Backend> {
    /// `[BS, hidden]`: this rank's tokens (BS may be 0).
    pub x: &'a B::Tensor,
    /// `[BS · top_k]`: their routed experts, global ids.
    pub ids: &'a [i32],
    /// `[BS, top_k]`: their routing weights.
    pub weights: &'a B::Tensor,
    /// The experts rank r of the group holds, `held[r]` (contiguous, in rank order).
    pub held: &'a [Range<usize>],
    /// The most tokens any rank of the group dispatches in this call (the same on every rank;
    /// fused kernels size their buffers by it, MC2's `globalBs / epWorldSize`).
    pub most_tokens: usize,
    /// The activations' precision, the same on every rank (fused kernels that move BF16 rows
    /// apply only where the values are BF16 values).
    pub precision: Precision,
}

/// The rows one rank's experts must run after a dispatch, and how their outputs go back.
pub struct Dispatched<B: Backend> {
    /// `[R, hidden]`: one row per (token, expert) pair this rank's experts serve (R may be 0).
    pub rows: B::Tensor,
    /// `[R]`: each row's expert as an index into this rank's experts.
    pub experts: Vec<i32>,
    /// `[R, 1]`: each row's routing weight, which the expert applies before `w2` (V4's
    /// order). `None` when the implementation applies the weights at the combine instead
    /// (Huawei's MC2 on Atlas A3 carries no weights with the rows): the expert then runs
    /// unweighted, which rounds differently in BF16 (the weight after `w2` instead of before).
    pub weights: Option<B::Tensor>,
    /// Tokens of the dispatching rank (`BS`), the rows [`Communicator::moe_combine`] returns.
    pub tokens: usize,
    /// What the paired combine needs; only the implementation that made it reads it.
    pub route: Route<B>,
}

/// How a [`Dispatched`]'s rows return to their tokens.
pub enum Route<B: Backend> {
    /// The composition's: the tokens of the pairs this rank sent, in send order (`None`: it
    /// sent none), and how many rows came from each rank.
    Composed { tokens: Option<B::Index>, received: Vec<usize> },
    /// A device implementation's own record (a fused kernel's assist tensors).
    Device(Box<dyn Any + Send + Sync>),
}

/// The composition of [`Communicator::moe_dispatch`]: see the module doc.
///
/// # Errors
/// Shapes that disagree, an id no rank holds, or a failed collective (on every rank).
pub fn dispatch<B: Backend, C: Communicator<B> + ?Sized>(
    comm: &C,
    be: &B,
    args: &DispatchArgs<'_, B>,
) -> Result<Dispatched<B>> {
    let (x, ids, weights, held) = (args.x, args.ids, args.weights, args.held);
    let (bs, hidden, top_k) = check_args(args, comm.size())?;
    let plan = DispatchPlan::new(ids, held)?;
    let pairs = plan.slots.len();
    // Rows and (weight, expert) of the pairs in send order. No pairs: empty tensors, which
    // the collectives accept (they move nothing).
    let (rows, meta, tokens) = if pairs == 0 {
        (be.narrow(x, 0, 0, 0)?, be.upload(&[], &[0, 2])?, None)
    } else {
        let token_of: Vec<i32> = plan.slots.iter().map(|&s| (s / top_k) as i32).collect();
        let slots: Vec<i32> = plan.slots.iter().map(|&s| s as i32).collect();
        let tokens = be.upload_index(&token_of, &[pairs])?;
        let flat_w = be.reshape(weights, &[bs * top_k, 1])?;
        let w = be.index_select(&flat_w, &be.upload_index(&slots, &[pairs])?)?;
        let local: Vec<f32> = plan.local_ids.iter().map(|&e| e as f32).collect();
        let meta = be.concat(&[&w, &be.upload(&local, &[pairs, 1])?], 1)?;
        (be.index_select(x, &tokens)?, meta, Some(tokens))
    };
    let (rows, received) = comm.all_to_all_v(be, &rows, &plan.send_rows)?;
    let (meta, _) = comm.all_to_all_v(be, &meta, &plan.send_rows)?;
    let r = rows.shape()[0];
    debug_assert_eq!(rows.shape(), &[r, hidden]);
    let host = be.download(&meta)?;
    let experts: Vec<i32> = host.chunks_exact(2).map(|m| m[1] as i32).collect();
    let w: Vec<f32> = host.chunks_exact(2).map(|m| m[0]).collect();
    let weights = Some(be.upload(&w, &[r, 1])?);
    Ok(Dispatched { rows, experts, weights, tokens: bs, route: Route::Composed { tokens, received } })
}

/// The composition of [`Communicator::moe_combine`]: `outputs` `[R, hidden]` (the expert
/// outputs of `d.rows`, weighted) go back to their ranks, which sum them per token →
/// `[BS, hidden]` (zero rows for tokens with no pairs).
///
/// # Errors
/// `outputs` not matching `d.rows`, a [`Route`] of another implementation, or a failed
/// collective.
pub fn combine<B: Backend, C: Communicator<B> + ?Sized>(
    comm: &C,
    be: &B,
    outputs: &B::Tensor,
    d: &Dispatched<B>,
) -> Result<B::Tensor> {
    let Route::Composed { tokens, received } = &d.route else {
        return Err(Error::Input("moe_combine: the dispatch was made by a device kernel, not the composition".into()));
    };
    let hidden = d.rows.shape()[1];
    if outputs.shape() != [d.experts.len(), hidden] {
        return Err(Error::Input(format!(
            "moe_combine: outputs {:?} do not match the {} dispatched rows of width {hidden}",
            outputs.shape(),
            d.experts.len()
        )));
    }
    let (back, _) = comm.all_to_all_v(be, outputs, received)?;
    let zeros = be.full(&[d.tokens, hidden], 0.0)?;
    match tokens {
        Some(tokens) => be.index_add(&zeros, tokens, &back),
        None => Ok(zeros),
    }
}

/// Shapes of a dispatch's arguments: (BS, hidden, top_k).
///
/// # Errors
/// Shapes that disagree with each other, with the group, or with `most_tokens`.
pub fn check_args<B: Backend>(args: &DispatchArgs<'_, B>, size: usize) -> Result<(usize, usize, usize)> {
    let (x, ids, weights, held) = (args.x, args.ids, args.weights, args.held);
    let bad = |msg: String| Err(Error::Input(format!("moe_dispatch: {msg}")));
    let &[bs, hidden] = x.shape() else { return bad(format!("x {:?} is not [tokens, hidden]", x.shape())) };
    let &[wb, top_k] = weights.shape() else {
        return bad(format!("weights {:?} are not [tokens, top_k]", weights.shape()));
    };
    if wb != bs || ids.len() != bs * top_k {
        return bad(format!("x {:?}, weights {:?} and {} ids disagree", x.shape(), weights.shape(), ids.len()));
    }
    if held.len() != size {
        return bad(format!("{} expert ranges for a group of {size} ranks", held.len()));
    }
    if bs > args.most_tokens {
        return bad(format!("{bs} tokens, more than the group's most_tokens {}", args.most_tokens));
    }
    Ok((bs, hidden, top_k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_groups_pairs_by_rank_in_slot_order() {
        // 3 tokens × top-2 over 8 experts on 3 ranks holding 3, 3 and 2.
        let held = [0..3, 3..6, 6..8];
        let ids = [7, 0, 3, 4, 2, 6];
        let p = DispatchPlan::new(&ids, &held).unwrap();
        assert_eq!(p.send_rows, vec![2, 2, 2]);
        assert_eq!(p.slots, vec![1, 4, 2, 3, 0, 5]);
        assert_eq!(p.local_ids, vec![0, 2, 0, 1, 1, 0]);
    }

    #[test]
    fn an_id_no_rank_holds_is_refused() {
        let held = [0..2, 2..4];
        for bad in [4, -1] {
            let e = DispatchPlan::new(&[0, bad], &held).unwrap_err().to_string();
            assert!(e.contains(&format!("expert id {bad} is outside 0..4")), "{e}");
        }
        assert_eq!(DispatchPlan::new(&[], &held).unwrap().send_rows, vec![0, 0]);
    }
}
