//! Data-parallel attention in the engine (`dsv4 serve --devices N --data-parallel-attention`,
//! SGLang's `--enable-dp-attention`; [`dsv4_core::parallel::ParallelLayout::data_parallel_attention`]).
//!
//! Each rank's engine runs sequences of its own: its own queue, scheduler, pool, sampling and
//! streams. The routed experts are split over the ranks, so the ranks still step together:
//! every step each rank runs its own batch through [`dsv4_core::Model::step`], or
//! [`dsv4_core::Model::idle_step`] when it has none, and the model's MoE exchange joins them at
//! every layer.
//!
//! Rank 0's engine (the leader) is the only one the handle talks to. Each iteration it takes
//! the requests that arrived and hands each to the rank with the fewest requests, in turn
//! among equals ([`least_loaded`]; SGLang's DP controller shares round-robin, vLLM's by
//! queue lengths): its own engine, or a follower, which gets its share (perhaps none) as
//! the message that starts its iteration, so no rank runs ahead. After the step every follower
//! reports how many requests it holds. The leader waits for new requests only when every rank
//! reported none: a rank never waits in an exchange for a rank that sleeps, and the ranks never
//! spin on exchanges while the server is idle.
//!
//! A rank whose engine stops drops its channels and its communicators: the leader's next
//! message or report fails, the others' next exchange fails (on communicators that notice a
//! rank leaving; on NCCL's they wait, and `dsv4 serve` ends the process on the handle's
//! [`crate::EngineHandle::stopped`]), and the whole engine stops with that error. Any failed
//! step stops the group, even one that failed before its exchange: the others may be waiting in
//! it.

use std::sync::mpsc::{channel, Receiver, Sender};

use crate::engine::Submitted;

/// An engine's part in a data-parallel group.
pub(crate) enum DataParallel {
    /// Rank 0: shares out the requests, hears every follower's load.
    Lead { followers: Vec<Follower>, next: usize },
    /// Any other rank: runs the requests the leader hands it, reports its load after each step.
    Follow { work: Receiver<Vec<Submitted>>, load: Sender<usize> },
}

/// The leader's link to one follower.
pub(crate) struct Follower {
    work: Sender<Vec<Submitted>>,
    load: Receiver<usize>,
    /// Requests the follower held at its last report (queued, preempted or running).
    held: usize,
}

/// The parts of a group of `ranks` engines, in rank order: rank 0 leads.
pub(crate) fn group(ranks: usize) -> Vec<DataParallel> {
    let mut followers = vec![];
    let mut parts = vec![];
    for _ in 1..ranks {
        let (work_tx, work_rx) = channel();
        let (load_tx, load_rx) = channel();
        followers.push(Follower { work: work_tx, load: load_rx, held: 0 });
        parts.push(DataParallel::Follow { work: work_rx, load: load_tx });
    }
    parts.insert(0, DataParallel::Lead { followers, next: 0 });
    parts
}

/// The rank (an index of `held`) with the fewest requests; among equals the first from
/// `next` on, cyclically, so that requests one at a time go round the ranks. Its count goes up
/// by one and `next` moves past it. `held` is not empty.
pub(crate) fn least_loaded(held: &mut [usize], next: &mut usize) -> usize {
    let n = held.len();
    let r = (0..n).map(|i| (*next + i) % n).min_by_key(|&r| held[r]).expect("a group has ranks");
    held[r] += 1;
    *next = (r + 1) % n;
    r
}

impl DataParallel {
    /// Leader: whether some follower held requests at its last report.
    pub(crate) fn followers_busy(&self) -> bool {
        match self {
            DataParallel::Lead { followers, .. } => followers.iter().any(|f| f.held > 0),
            DataParallel::Follow { .. } => false,
        }
    }

    /// Leader: hands each of `arrived` (in order) to the rank holding the fewest requests, the
    /// leader itself holding `own`; sends every follower its share, and returns the leader's.
    /// When a follower has stopped: why, and every request not handed over (the leader's share
    /// included), to be answered with the error.
    pub(crate) fn share(
        &mut self,
        arrived: Vec<Submitted>,
        own: usize,
    ) -> Result<Vec<Submitted>, (String, Vec<Submitted>)> {
        let DataParallel::Lead { followers, next } = self else {
            return Err(("a follower does not share out requests".into(), arrived));
        };
        let mut held: Vec<usize> = std::iter::once(own).chain(followers.iter().map(|f| f.held)).collect();
        let mut shares: Vec<Vec<Submitted>> = (0..held.len()).map(|_| vec![]).collect();
        for s in arrived {
            shares[least_loaded(&mut held, next)].push(s);
        }
        let mine = std::mem::take(&mut shares[0]);
        let mut shares = shares.into_iter().skip(1);
        for (r, f) in followers.iter().enumerate() {
            let share = shares.next().expect("a share per follower");
            if let Err(std::sync::mpsc::SendError(share)) = f.work.send(share) {
                let unsent = mine.into_iter().chain(share).chain(shares.flatten()).collect();
                return Err((format!("the engine of rank {} stopped", r + 1), unsent));
            }
        }
        Ok(mine)
    }

    /// Follower: the requests the leader handed this rank for this iteration (waits for them).
    pub(crate) fn receive(&self) -> Result<Vec<Submitted>, String> {
        match self {
            DataParallel::Follow { work, .. } => work.recv().map_err(|_| "rank 0's engine stopped".into()),
            DataParallel::Lead { .. } => Err("the leader receives requests from the handle".into()),
        }
    }

    /// After a step: a follower reports the `held` requests it has left; the leader waits for
    /// every follower's report. Err if a rank has stopped.
    pub(crate) fn report(&mut self, held: usize) -> Result<(), String> {
        match self {
            DataParallel::Follow { load, .. } => load.send(held).map_err(|_| "rank 0's engine stopped".into()),
            DataParallel::Lead { followers, .. } => {
                for (r, f) in followers.iter_mut().enumerate() {
                    f.held = f.load.recv().map_err(|_| format!("the engine of rank {} stopped", r + 1))?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_to_the_rank_holding_the_fewest_in_turn_among_equals() {
        let mut next = 0;
        let mut held = vec![2, 0, 1, 0];
        let picks: Vec<usize> = (0..6).map(|_| least_loaded(&mut held, &mut next)).collect();
        assert_eq!(picks, [1, 3, 1, 2, 3, 0]);
        assert_eq!(held, [3, 2, 2, 2]);
        // One at a time (each done before the next): round the ranks.
        next = 0;
        let picks: Vec<usize> = (0..5).map(|_| least_loaded(&mut [0, 0, 0], &mut next)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1]);
    }

    #[test]
    fn the_leader_hears_every_report_and_a_stopped_follower_is_an_error() {
        let mut parts = group(3);
        let f2 = parts.pop().unwrap();
        let mut f1 = parts.pop().unwrap();
        let mut lead = parts.pop().unwrap();
        assert!(!lead.followers_busy());
        assert_eq!(lead.share(vec![], 0).map_err(|e| e.0).unwrap().len(), 0);
        assert_eq!(f1.receive().unwrap().len(), 0);
        f1.report(4).unwrap();
        drop(f2);
        let err = lead.report(0).unwrap_err();
        assert_eq!(err, "the engine of rank 2 stopped");
        assert!(lead.followers_busy(), "rank 1 reported 4 requests");
        // Sharing with a stopped follower loses no request: the ones not handed over come back.
        let req = |id| {
            let greedy = dsv4_core::sampling::SamplingParams::greedy();
            let r = crate::GenerationRequest {
                prompt: vec![1],
                sampling: greedy,
                max_tokens: 1,
                stop_token_ids: vec![],
                logprobs: None,
            };
            Submitted::replica(id, r).unwrap()
        };
        // The leader holds 5, rank 1 4, rank 2 none: rank 2 (gone) takes the first four, rank 1
        // the fifth, then ranks 2 and 1 alternate.
        let Err((why, unsent)) = lead.share((0..6).map(req).collect(), 5) else {
            panic!("a share for a stopped follower was sent");
        };
        assert_eq!(why, "the engine of rank 2 stopped");
        let mut ids: Vec<u64> = unsent.iter().map(|s| s.id).collect();
        ids.sort();
        let handed: Vec<u64> = f1.receive().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(ids.len() + handed.len(), 6, "unsent {ids:?}, handed to rank 1 {handed:?}");
    }
}
