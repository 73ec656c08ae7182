//! What one forward step processes: tokens of one or more sequences, each a contiguous run of
//! rows in the activation tensors, with absolute positions.

use std::ops::Range;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    /// Rows of each sequence in `tokens`.
    pub seqs: Vec<Range<usize>>,
}

impl Batch {
    /// Whole-prompt prefill of independent sequences, each starting at position 0.
    pub fn prefill(prompts: &[&[u32]]) -> Result<Self> {
        let mut b = Batch { tokens: vec![], positions: vec![], seqs: vec![] };
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::Input(format!("sequence {i} has no tokens")));
            }
            let start = b.tokens.len();
            b.tokens.extend_from_slice(p);
            b.positions.extend(0..p.len());
            b.seqs.push(start..b.tokens.len());
        }
        if b.tokens.is_empty() {
            return Err(Error::Input("no sequences given".into()));
        }
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}
