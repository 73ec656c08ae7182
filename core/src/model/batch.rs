//! What one forward step processes: tokens of one or more sequences, each a contiguous run of
//! rows in the activation tensors, each continuing at its own position.

use std::ops::Range;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Vec<u32>,
    /// Absolute position of every token.
    pub positions: Vec<usize>,
    /// Rows of each sequence in `tokens`.
    pub seqs: Vec<Range<usize>>,
}

impl Batch {
    /// Sequences given as (tokens of this step, position of the first one).
    pub fn new(parts: &[(&[u32], usize)]) -> Result<Self> {
        let mut b = Batch { tokens: vec![], positions: vec![], seqs: vec![] };
        for (i, (toks, start)) in parts.iter().enumerate() {
            if toks.is_empty() {
                return Err(Error::Input(format!("sequence {i} has no tokens")));
            }
            let first = b.tokens.len();
            b.tokens.extend_from_slice(toks);
            b.positions.extend(*start..*start + toks.len());
            b.seqs.push(first..b.tokens.len());
        }
        if b.tokens.is_empty() {
            return Err(Error::Input("no sequences given".into()));
        }
        Ok(b)
    }

    /// Whole-prompt prefill of independent sequences, each starting at position 0.
    pub fn prefill(prompts: &[&[u32]]) -> Result<Self> {
        let parts: Vec<(&[u32], usize)> = prompts.iter().map(|p| (*p, 0)).collect();
        Self::new(&parts)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Position of sequence k's first token in this step.
    pub fn start(&self, k: usize) -> usize {
        self.positions[self.seqs[k].start]
    }
}
