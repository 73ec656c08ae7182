//! What goes into one step: the budget a step's sequences draw from.
//!
//! A step takes, in order, every running request's next chunk (one token when it decodes,
//! a prompt chunk while it prefills), then new requests from the queue, first come first
//! served, while three budgets last: tokens (`--max-num-batched-tokens`), sequences
//! (`--max-num-seqs`) and the pool's free blocks of each kind. A running request that cannot
//! get its blocks preempts the youngest request admitted after it (its blocks are released
//! and it is fed again later from its cached prefix), so the oldest requests always make
//! progress and a full pool never corrupts or stalls anyone.

use dsv4_core::kv::KvCache;
use dsv4_core::Backend;

use crate::engine::EngineConfig;

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Tokens it feeds this step.
    pub tokens: usize,
    /// (compressed, window) blocks it must be given first.
    pub blocks: (usize, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Take,
    NoTokenBudget,
    NoSeqBudget,
    NoBlocks,
}

/// What is left of a step's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget {
    pub tokens: usize,
    pub seqs: usize,
    pub compressed_blocks: usize,
    pub window_blocks: usize,
}

impl StepBudget {
    pub fn new<B: Backend>(cache: &KvCache<B>, config: &EngineConfig) -> Self {
        let (c, w) = cache.available_blocks();
        StepBudget {
            tokens: config.max_num_batched_tokens,
            seqs: config.max_num_seqs,
            compressed_blocks: c,
            window_blocks: w,
        }
    }

    /// Whether `c` fits what is left.
    pub fn fits(&self, c: Candidate) -> bool {
        self.check(c) == Decision::Take
    }

    fn check(&self, c: Candidate) -> Decision {
        if self.seqs == 0 {
            Decision::NoSeqBudget
        } else if c.tokens > self.tokens {
            Decision::NoTokenBudget
        } else if c.blocks.0 > self.compressed_blocks || c.blocks.1 > self.window_blocks {
            Decision::NoBlocks
        } else {
            Decision::Take
        }
    }

    /// Takes `c` from the budgets if it fits.
    pub fn try_take(&mut self, c: Candidate) -> Decision {
        let d = self.check(c);
        if d == Decision::Take {
            self.tokens -= c.tokens;
            self.seqs -= 1;
            self.compressed_blocks -= c.blocks.0;
            self.window_blocks -= c.blocks.1;
        }
        d
    }

    /// Whether a new request may join now, with `running` requests in the batch. `needs` is
    /// what it will hold at most while it prefills: the compressed blocks of its whole prompt
    /// and the window blocks its window and a prompt chunk span. They must fit the blocks left
    /// after this step's takes, keeping one free window block per running request so that
    /// decoding requests rarely have to preempt (vLLM's watermark, in blocks).
    pub fn admits(&self, needs: (usize, usize), running: usize) -> bool {
        self.seqs > 0 && needs.0 <= self.compressed_blocks && needs.1 + running <= self.window_blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> StepBudget {
        StepBudget { tokens: 10, seqs: 3, compressed_blocks: 4, window_blocks: 6 }
    }

    #[test]
    fn takes_until_a_budget_runs_out() {
        let mut b = budget();
        assert_eq!(b.try_take(Candidate { tokens: 8, blocks: (2, 2) }), Decision::Take);
        assert_eq!(b.try_take(Candidate { tokens: 3, blocks: (0, 0) }), Decision::NoTokenBudget);
        assert_eq!(b.try_take(Candidate { tokens: 1, blocks: (3, 0) }), Decision::NoBlocks);
        assert_eq!(b.try_take(Candidate { tokens: 1, blocks: (0, 5) }), Decision::NoBlocks);
        assert_eq!(b.try_take(Candidate { tokens: 1, blocks: (1, 1) }), Decision::Take);
        assert_eq!(b.try_take(Candidate { tokens: 1, blocks: (0, 0) }), Decision::Take);
        assert_eq!(b.try_take(Candidate { tokens: 0, blocks: (0, 0) }), Decision::NoSeqBudget);
        assert_eq!(b, StepBudget { tokens: 0, seqs: 0, compressed_blocks: 1, window_blocks: 3 });
    }

    #[test]
    fn admission_keeps_a_window_block_per_running_request() {
        let b = budget();
        assert!(b.admits((4, 2), 0));
        assert!(!b.admits((5, 2), 0));
        assert!(b.admits((1, 2), 4));
        assert!(!b.admits((1, 2), 5));
        assert!(!StepBudget { seqs: 0, ..b }.admits((0, 0), 0));
    }
}
