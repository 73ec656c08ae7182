//! Per-sequence decoding state (spec §C.1). Everything a later step needs from earlier tokens
//! lives here, on the device, and nothing grows with context × heads:
//!
//! * every layer: the last `window − 1` shared K=V rows (normed and roped);
//! * compressed layers: all compressed entries so far, plus the compressor's incomplete
//!   window (raw projections of < ratio tokens) and, for CSA, the first halves of the last
//!   complete window (the overlap that the next entry pools);
//! * CSA layers: the same for the indexer's own compressor (its keys).
//!
//! A whole prompt, a chunk of it, or one token are all "a step": the graph reads the state,
//! processes the step's tokens, and writes the state back, so chunked prefill and token-by-token
//! decoding compute exactly what one whole-prompt forward does.

use crate::backend::{Backend, DeviceTensor};

/// A compressor's carry-over between steps.
pub struct CompressorState<B: Backend> {
    /// Raw `wkv·x` rows of the incomplete window, `[r, width]` with r < ratio.
    pub pending_kv: Option<B::Tensor>,
    /// `wgate·x + ape[pos mod ratio]` of the same rows.
    pub pending_score: Option<B::Tensor>,
    /// CSA only: first halves (content, score) of the last complete window, `[ratio, dim]` each.
    pub overlap: Option<(B::Tensor, B::Tensor)>,
    /// Every entry emitted so far, `[n, dim]` (normed and roped).
    pub entries: Option<B::Tensor>,
    /// Number of complete windows so far (`entries` rows).
    pub windows: usize,
}

impl<B: Backend> Default for CompressorState<B> {
    fn default() -> Self {
        CompressorState { pending_kv: None, pending_score: None, overlap: None, entries: None, windows: 0 }
    }
}

impl<B: Backend> CompressorState<B> {
    fn bytes(&self) -> usize {
        let t = |x: &Option<B::Tensor>| x.as_ref().map_or(0, |t| t.numel() * 4);
        t(&self.pending_kv)
            + t(&self.pending_score)
            + self.overlap.as_ref().map_or(0, |(a, b)| (a.numel() + b.numel()) * 4)
            + t(&self.entries)
    }
}

/// The state of one layer for one sequence.
pub struct LayerState<B: Backend> {
    /// The last `min(window − 1, seen)` K=V rows, `[rows, head_dim]`.
    pub window: Option<B::Tensor>,
    /// Attention compressor (CSA/HCA layers).
    pub compressor: CompressorState<B>,
    /// Indexer compressor, whose entries are the indexer keys (CSA layers).
    pub indexer: CompressorState<B>,
}

impl<B: Backend> Default for LayerState<B> {
    fn default() -> Self {
        LayerState { window: None, compressor: CompressorState::default(), indexer: CompressorState::default() }
    }
}

/// Everything one sequence carries between steps.
pub struct SeqState<B: Backend> {
    pub layers: Vec<LayerState<B>>,
    /// Tokens processed so far (= the position of the next token).
    pub pos: usize,
}

impl<B: Backend> SeqState<B> {
    pub fn new(num_layers: usize) -> Self {
        SeqState { layers: (0..num_layers).map(|_| LayerState::default()).collect(), pos: 0 }
    }

    /// Device bytes held by this sequence's state.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.window.as_ref().map_or(0, |t| t.numel() * 4) + l.compressor.bytes() + l.indexer.bytes())
            .sum()
    }
}
