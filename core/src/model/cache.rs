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

/// Bytes of decoding state one sequence holds after `context` tokens, per layer, from the
/// layout alone (what [`SeqState::bytes`] measures on a real run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerCacheBytes {
    pub kind: crate::config::AttentionKind,
    /// Sliding-window K=V rows.
    pub window: usize,
    /// Compressed attention entries (CSA/HCA).
    pub entries: usize,
    /// Indexer keys (CSA).
    pub index_keys: usize,
    /// Compressor carry: the incomplete window and the CSA overlap halves (bounded, O(ratio)).
    pub carry: usize,
}

impl LayerCacheBytes {
    pub fn total(&self) -> usize {
        self.window + self.entries + self.index_keys + self.carry
    }
}

/// The cache layout of every layer at `context` tokens, with `elem` bytes per stored value
/// (4 for dsv4's f32 state).
pub fn cache_layout(cfg: &crate::config::ModelConfig, context: usize, elem: usize) -> Vec<LayerCacheBytes> {
    use crate::config::AttentionKind;
    let window = (cfg.sliding_window - 1).min(context) * cfg.head_dim * elem;
    // A compressor of ratio m and entry width `dim` (two halves per token when overlapping).
    let compressor = |m: usize, dim: usize, overlap: bool| -> (usize, usize) {
        let width = if overlap { 2 * dim } else { dim };
        let entries = context / m * dim * elem;
        let pending = context % m * width * 2 * elem;
        let overlap_rows = if overlap && context >= m { 2 * m * dim * elem } else { 0 };
        (entries, pending + overlap_rows)
    };
    cfg.attention
        .iter()
        .map(|&kind| match kind {
            AttentionKind::Sliding => LayerCacheBytes { kind, window, entries: 0, index_keys: 0, carry: 0 },
            AttentionKind::Hca { ratio } => {
                let (entries, carry) = compressor(ratio, cfg.head_dim, false);
                LayerCacheBytes { kind, window, entries, index_keys: 0, carry }
            }
            AttentionKind::Csa { ratio } => {
                let (entries, carry) = compressor(ratio, cfg.head_dim, true);
                let (index_keys, index_carry) = compressor(ratio, cfg.index_head_dim, true);
                LayerCacheBytes { kind, window, entries, index_keys, carry: carry + index_carry }
            }
        })
        .collect()
}

impl<B: Backend> SeqState<B> {
    /// Bytes per layer, measured on the tensors actually held.
    pub fn layer_bytes(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|l| l.window.as_ref().map_or(0, |t| t.numel() * 4) + l.compressor.bytes() + l.indexer.bytes())
            .collect()
    }
}
