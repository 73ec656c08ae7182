//! Mixture of experts (spec §B.5): sqrt-softplus router scores, selection by top-k of
//! score + correction bias (or a fixed `tid2eid` table on hash layers), weights normalised
//! over the chosen experts and scaled, clamped-SwiGLU experts, plus one shared expert.

use crate::backend::DeviceTensor;
use crate::backend::{Backend, BinaryOp, ExpertWeights};
use crate::config::{ModelConfig, RoutingKind, ScoringFunc};
use crate::error::{Error, Result};
use crate::model::loader::{fused_experts, Loader};
use crate::parallel::dispatch::DispatchArgs;
use crate::parallel::layout::split;
use crate::parallel::{Communicator, MoeExchange};
use crate::precision::Precision;
use crate::quant::scale_name;
use crate::tensor::StoredWeight;
use std::ops::Range;
use std::sync::Arc;

enum Selection<B: Backend> {
    /// `tid2eid`, `[vocab, k]`, kept on the host: selection is a table lookup by token id.
    Hash(Vec<i32>),
    /// Correction bias `[E]`, added to the scores for selection only.
    TopK(B::Tensor),
}

pub struct Moe<B: Backend> {
    gate: B::Weight,
    selection: Selection<B>,
    /// The routed experts this rank holds: ids `held.start..held.end` (all of them on one
    /// device; a block of them under expert parallelism, [`crate::parallel`]).
    experts: Vec<ExpertWeights<B::Weight>>,
    held: Range<usize>,
    /// The EP group that sums the ranks' routed outputs, when the experts are split.
    ep: Option<Arc<dyn Communicator<B>>>,
    /// How the EP group exchanges activations, and the experts each of its ranks holds.
    exchange: MoeExchange,
    group_held: Vec<Range<usize>>,
    /// Data-parallel attention: the tokens of a step are this rank's own (not replicated), so
    /// the dispatch exchanges them all, without slicing or all-gathering.
    data_parallel: bool,
    /// `D`, the width of the no-token input an idle rank exchanges ([`Moe::idle`]).
    hidden: usize,
    shared: ExpertWeights<B::Weight>,
    top_k: usize,
    scoring: ScoringFunc,
    routed_scale: f32,
    limit: f32,
    vocab: usize,
}

fn load_expert<B: Backend>(ld: &mut Loader<B>, p: &str, d: usize, i: usize) -> Result<ExpertWeights<B::Weight>> {
    let w1 = ld.proj(&format!("{p}.w1.weight"), &[i, d])?;
    let w2 = ld.proj(&format!("{p}.w2.weight"), &[d, i])?;
    let w3 = ld.proj(&format!("{p}.w3.weight"), &[i, d])?;
    // V4 checkpoints store an expert's three matrices alike; one that mixes forms is treated as
    // float (its inputs are not quantised) rather than quantised where the official code would not.
    Ok(ExpertWeights { low_bit: w1.low_bit && w2.low_bit && w3.low_bit, w1: w1.w, w2: w2.w, w3: w3.w })
}

/// Experts stored fused, as transformers keeps them: `gate_up_proj` `[E, 2I, D]` (rows 0..I are
/// w1, I..2I are w3) and `down_proj` `[E, D, I]`. Float storage only: each expert's matrices
/// are zero-copy views of the fused tensors.
fn load_fused_experts<B: Backend>(
    ld: &mut Loader<B>,
    p: &str,
    e: usize,
    held: Range<usize>,
    d: usize,
    i: usize,
) -> Result<Vec<ExpertWeights<B::Weight>>> {
    let gate_up = ld.ckpt.require(&format!("{p}.gate_up_proj"), &[e, 2 * i, d])?.clone();
    let down = ld.ckpt.require(&format!("{p}.down_proj"), &[e, d, i])?.clone();
    for t in [&gate_up, &down] {
        if !t.dtype.is_float() {
            return Err(Error::Tensor {
                name: t.name.clone(),
                file: t.source.clone(),
                msg: format!(
                    "fused expert tensors must be floating point, found {} (quantised experts are read per expert, \
                     `experts.{{e}}.w1.weight` with `.scale`)",
                    t.dtype
                ),
            });
        }
    }
    held.map(|x| {
        let gu = gate_up.index_outer(x, format!("{p}.gate_up_proj[{x}]"))?;
        Ok(ExpertWeights {
            w1: ld.upload(&StoredWeight::float(gu.rows_outer(0, i, format!("{p}.{x}.w1"))?)?)?,
            w3: ld.upload(&StoredWeight::float(gu.rows_outer(i, i, format!("{p}.{x}.w3"))?)?)?,
            w2: ld.upload(&StoredWeight::float(down.index_outer(x, format!("{p}.down_proj[{x}]"))?)?)?,
            low_bit: false,
        })
    })
    .collect()
}

impl<B: Backend> Moe<B> {
    pub fn load(ld: &mut Loader<B>, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        Self::load_at(ld, cfg, &format!("layers.{layer}.ffn"), cfg.routing[layer])
    }

    /// The MoE whose tensors live under `p` (`layers.3.ffn`, `mtp.0.ffn`), routed by `routing`.
    pub fn load_at(ld: &mut Loader<B>, cfg: &ModelConfig, p: &str, routing: RoutingKind) -> Result<Self> {
        let (d, e, i, k) = (cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok);
        let selection = match routing {
            RoutingKind::Hash => {
                Selection::Hash(ld.host_ints(&format!("{p}.gate.tid2eid"), &[cfg.vocab_size, k], e as i64)?)
            }
            RoutingKind::TopK => Selection::TopK(ld.tensor(&format!("{p}.gate.bias"), &[e])?),
        };
        let held = ld.rank.layout.experts(cfg);
        let experts = if fused_experts(ld.ckpt, p) {
            load_fused_experts(ld, &format!("{p}.experts"), e, held.clone(), d, i)?
        } else {
            let experts = held.clone().map(|x| load_expert(ld, &format!("{p}.experts.{x}"), d, i));
            let experts = experts.collect::<Result<_>>()?;
            // The experts other ranks hold count as loaded for the progress bar.
            for x in (0..e).filter(|x| !held.contains(x)) {
                for w in ["w1", "w2", "w3"] {
                    let name = format!("{p}.experts.{x}.{w}.weight");
                    let scale = scale_name(&name).is_some_and(|s| ld.ckpt.get(&s).is_some());
                    ld.skip(1 + usize::from(scale));
                }
            }
            experts
        };
        Ok(Moe {
            gate: ld.weight(&format!("{p}.gate.weight"), &[e, d])?,
            selection,
            experts,
            held,
            ep: ld.rank.ep.clone(),
            exchange: ld.rank.layout.layout.moe,
            group_held: (0..ld.rank.layout.layout.ep).map(|r| split(e, ld.rank.layout.layout.ep, r)).collect(),
            data_parallel: ld.rank.layout.layout.data_parallel_attention,
            hidden: d,
            shared: load_expert(ld, &format!("{p}.shared_experts"), d, i)?,
            top_k: k,
            scoring: cfg.scoring_func,
            routed_scale: cfg.routed_scaling_factor as f32,
            limit: cfg.swiglu_limit as f32,
            vocab: cfg.vocab_size,
        })
    }

    /// x `[T, D]` (ffn_norm'ed), `tokens` the ids of the T rows (hash routing reads them).
    /// The router runs in f32 whatever `prec` (spec §B.7); the experts' outputs and the sum are
    /// in `prec`. `most_tokens`: the most tokens any rank of the EP group has in this step (T
    /// unless attention is data-parallel, [`crate::Model::step`] agrees on it once a step).
    pub fn forward(
        &self,
        be: &B,
        x: &B::Tensor,
        tokens: &[u32],
        most_tokens: usize,
        prec: Precision,
    ) -> Result<B::Tensor> {
        let t = x.shape()[0];
        let logits = be.linear(x, &self.gate)?;
        let (host_ids, w) = match &self.selection {
            Selection::Hash(table) => {
                let mut host = Vec::with_capacity(t * self.top_k);
                for &tok in tokens {
                    let tok = tok as usize;
                    if tok >= self.vocab {
                        return Err(Error::Input(format!(
                            "token id {tok} is outside the vocabulary (size {})",
                            self.vocab
                        )));
                    }
                    host.extend_from_slice(&table[tok * self.top_k..(tok + 1) * self.top_k]);
                }
                let ids = be.upload_index(&host, &[t, self.top_k])?;
                let (_, w) = be.moe_route(&logits, self.scoring, None, Some(&ids), self.top_k, self.routed_scale)?;
                (host, w)
            }
            Selection::TopK(bias) => {
                let (ids, w) = be.moe_route(&logits, self.scoring, Some(bias), None, self.top_k, self.routed_scale)?;
                (be.download_index(&ids)?, w)
            }
        };
        let routed = match (&self.ep, self.exchange) {
            (None, _) => be.moe_experts(x, &host_ids, &w, &self.experts, self.limit, prec)?,
            (Some(ep), MoeExchange::AllReduce) => {
                ep.all_reduce_sum(be, &self.held_experts(be, x, &host_ids, &w, prec)?)?
            }
            (Some(ep), MoeExchange::AllToAll) if self.data_parallel => {
                self.check_ids(&host_ids)?;
                self.exchanged(be, ep.as_ref(), x, &host_ids, &w, most_tokens, prec)?
            }
            (Some(ep), MoeExchange::AllToAll) => self.dispatched_experts(be, ep.as_ref(), x, &host_ids, &w, prec)?,
        };
        let shared = be.expert_ffn(x, &self.shared, self.limit, prec)?;
        prec.act_of(be, be.binary(&routed, &shared, BinaryOp::Add))
    }

    /// Expert parallelism: the part of the routed output `[T, D]` that this rank's experts
    /// produce (zero rows for tokens none of them serve), as the official MoE computes it
    /// before its `all_reduce`. Each (token, expert) pair held here becomes one row of a
    /// `k = 1` call of [`Backend::moe_experts`].
    fn held_experts(&self, be: &B, x: &B::Tensor, ids: &[i32], w: &B::Tensor, prec: Precision) -> Result<B::Tensor> {
        let t = x.shape()[0];
        let (mut rows, mut slots, mut local) = (vec![], vec![], vec![]);
        for (slot, &id) in ids.iter().enumerate() {
            if self.held.contains(&(id as usize)) {
                rows.push((slot / self.top_k) as i32);
                slots.push(slot as i32);
                local.push(id - self.held.start as i32);
            }
        }
        let zeros = be.full(x.shape(), 0.0)?;
        if rows.is_empty() {
            return Ok(zeros);
        }
        let rows = be.upload_index(&rows, &[local.len()])?;
        let slots = be.upload_index(&slots, &[local.len()])?;
        let flat_w = be.reshape(w, &[t * self.top_k, 1])?;
        let (xs, ws) = (be.index_select(x, &rows)?, be.index_select(&flat_w, &slots)?);
        let ys = be.moe_experts(&xs, &local, &ws, &self.experts, self.limit, prec)?;
        be.index_add(&zeros, &rows, &ys)
    }

    /// Expert parallelism by token dispatch ([`MoeExchange::AllToAll`]) of replicated tokens:
    /// rank r of the EP group takes its slice of the tokens, [`exchanged`](Self::exchanged)
    /// gives the slice's routed output, and the group all-gathers the slices → the routed
    /// output `[T, D]`.
    fn dispatched_experts(
        &self,
        be: &B,
        ep: &dyn Communicator<B>,
        x: &B::Tensor,
        ids: &[i32],
        w: &B::Tensor,
        prec: Precision,
    ) -> Result<B::Tensor> {
        let t = x.shape()[0];
        self.check_ids(ids)?;
        let mine = split(t, ep.size(), ep.rank());
        let (xs, ws) = (be.narrow(x, 0, mine.start, mine.len())?, be.narrow(w, 0, mine.start, mine.len())?);
        let ids = &ids[mine.start * self.top_k..mine.end * self.top_k];
        let most_tokens = split(t, ep.size(), 0).len();
        let part = self.exchanged(be, ep, &xs, ids, &ws, most_tokens, prec)?;
        ep.all_gather(be, &part, 0)
    }

    /// Checks every id before an exchange. With replicated tokens every rank checks the same
    /// ids, so a bad one fails the whole group alike instead of only the rank whose slice holds
    /// it (the others would wait in the exchange). With data-parallel attention the ids are
    /// the rank's own: the others learn of its failure from the communicator (a rank that
    /// fails leaves it).
    fn check_ids(&self, ids: &[i32]) -> Result<()> {
        let experts = self.group_held.last().map_or(0, |h| h.end);
        match ids.iter().find(|&&id| id < 0 || id as usize >= experts) {
            Some(bad) => Err(Error::Input(format!("moe: expert id {bad} is outside 0..{experts}"))),
            None => Ok(()),
        }
    }

    /// One dispatch and combine over the EP group: this rank's tokens `xs` `[BS, D]` (BS may be
    /// 0), their experts `ids` `[BS · k]` and weights `ws` `[BS, k]` go to the experts' ranks,
    /// this rank's experts run the rows they receive, and the outputs come back summed per
    /// token → `[BS, D]`. `most_tokens`: the largest BS of the group in this call.
    #[allow(clippy::too_many_arguments)]
    fn exchanged(
        &self,
        be: &B,
        ep: &dyn Communicator<B>,
        xs: &B::Tensor,
        ids: &[i32],
        ws: &B::Tensor,
        most_tokens: usize,
        prec: Precision,
    ) -> Result<B::Tensor> {
        let args = DispatchArgs { x: xs, ids, weights: ws, held: &self.group_held, most_tokens, precision: prec };
        let d = ep.moe_dispatch(be, &args)?;
        // A rank whose experts got no pairs runs nothing (its output is the empty `rows`).
        let ys = if d.experts.is_empty() {
            d.rows.clone()
        } else {
            let ones;
            let weights = match &d.weights {
                Some(w) => w,
                None => {
                    ones = be.full(&[d.experts.len(), 1], 1.0)?;
                    &ones
                }
            };
            be.moe_experts(&d.rows, &d.experts, weights, &self.experts, self.limit, prec)?
        };
        ep.moe_combine(be, &ys, &d)
    }

    /// Data-parallel attention: this rank has no tokens in the step, but its experts may get
    /// rows from the other ranks of the EP group, so it takes part in the layer's exchange
    /// with no tokens of its own. `most_tokens` as in [`forward`](Self::forward).
    ///
    /// # Errors
    /// Not under data-parallel attention (elsewhere every rank steps the same tokens, so none
    /// is ever without), or a failed exchange.
    pub fn idle(&self, be: &B, most_tokens: usize, prec: Precision) -> Result<()> {
        let Some(ep) = self.ep.as_ref().filter(|_| self.data_parallel) else {
            return Err(Error::Input("moe: a rank steps without tokens only under data-parallel attention".into()));
        };
        // No rows: nothing to round to the precision.
        let x = be.upload(&[], &[0, self.hidden])?;
        let w = be.upload(&[], &[0, self.top_k])?;
        self.exchanged(be, ep.as_ref(), &x, &[], &w, most_tokens, prec)?;
        Ok(())
    }
}
