//! What the paged decoding state holds, from the config alone (spec §C.1): the pools of every
//! layer, the bytes of one block, and a sequence's footprint at a given length. `dsv4 inspect`
//! prints these; the tests check them against a live [`super::KvCache`] byte for byte.
//!
//! Two block kinds, both covering `block_tokens` consecutive positions of one sequence:
//! * a **compressed block** holds, for every compressed layer, the entries of those positions
//!   (`block_tokens / ratio` rows) and, on CSA layers, as many indexer keys. A sequence holds
//!   one per page for its whole life: this is the part that grows with context.
//! * a **window block** holds, for every layer, the sliding-window K=V rows of those positions,
//!   and for every compressor the carry (raw projections of an incomplete window, and for CSA
//!   the previous window) at the page's end. A sequence holds only the pages its window and its
//!   current carry reach (at most `⌈(window − 1) / block_tokens⌉ + 1`), so this part is bounded.
//!   Keeping the carry per page is what lets a prefix-cache hit restore the window *and* the
//!   compressors' state at the reuse point.

use crate::config::{AttentionKind, ModelConfig};
use crate::kv::format::{KvDtype, RowFormat};

/// The compressor of one layer kind: ratio, whether windows overlap (CSA), and entry width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressorShape {
    pub ratio: usize,
    pub overlap: bool,
    pub dim: usize,
}

impl CompressorShape {
    /// Width of one raw projection row (two halves when overlapping).
    pub fn width(&self) -> usize {
        if self.overlap {
            2 * self.dim
        } else {
            self.dim
        }
    }

    /// Carry rows per page for the projections and for the scores each: the official
    /// `kv_state` height (2·ratio with overlap, ratio without).
    pub fn carry_rows(&self) -> usize {
        if self.overlap {
            2 * self.ratio
        } else {
            self.ratio
        }
    }

    /// First position whose raw row the carry holds after `q` tokens: the incomplete window,
    /// and with overlap the complete window before it.
    pub fn carry_start(&self, q: usize) -> usize {
        let w = q / self.ratio;
        if self.overlap {
            w.saturating_sub(1) * self.ratio
        } else {
            w * self.ratio
        }
    }

    /// Bytes of one page's carry (projections and scores, f32).
    pub fn carry_bytes(&self) -> usize {
        2 * self.carry_rows() * RowFormat::F32.row_bytes(self.width())
    }
}

/// The pools of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLayout {
    pub kind: AttentionKind,
    /// Window rows and compressed entries share this format and width (`head_dim`).
    pub attn_format: RowFormat,
    pub head_dim: usize,
    /// The attention compressor (CSA/HCA layers).
    pub compressor: Option<CompressorShape>,
    /// The indexer's compressor and key format (CSA layers).
    pub indexer: Option<(CompressorShape, RowFormat)>,
}

impl LayerLayout {
    /// Entries (and indexer keys) one compressed block holds.
    pub fn entries_per_block(&self, block_tokens: usize) -> usize {
        self.compressor.map_or(0, |c| block_tokens / c.ratio)
    }

    /// This layer's share of a compressed block.
    pub fn compressed_block_bytes(&self, block_tokens: usize) -> usize {
        let e = self.entries_per_block(block_tokens);
        e * self.attn_format.row_bytes(self.head_dim) + self.indexer.map_or(0, |(c, f)| e * f.row_bytes(c.dim))
    }

    /// This layer's share of a window block.
    pub fn window_block_bytes(&self, block_tokens: usize) -> usize {
        block_tokens * self.attn_format.row_bytes(self.head_dim)
            + self.compressor.map_or(0, |c| c.carry_bytes())
            + self.indexer.map_or(0, |(c, _)| c.carry_bytes())
    }
}

/// Every layer's pools for a model and KV dtype.
pub fn layer_layouts(cfg: &ModelConfig, dtype: KvDtype) -> Vec<LayerLayout> {
    let attn_format = dtype.attention_format(cfg.rope_dim);
    cfg.attention
        .iter()
        .map(|&kind| {
            let (compressor, indexer) = match kind {
                AttentionKind::Sliding => (None, None),
                AttentionKind::Hca { ratio } => {
                    (Some(CompressorShape { ratio, overlap: false, dim: cfg.head_dim }), None)
                }
                AttentionKind::Csa { ratio } => (
                    Some(CompressorShape { ratio, overlap: true, dim: cfg.head_dim }),
                    Some((CompressorShape { ratio, overlap: true, dim: cfg.index_head_dim }, dtype.index_key_format())),
                ),
            };
            LayerLayout { kind, attn_format, head_dim: cfg.head_dim, compressor, indexer }
        })
        .collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The least common multiple of the compression ratios (1 for a sliding-only model): every
/// block size must be a multiple of it, so that block boundaries are window boundaries.
pub fn ratio_lcm(cfg: &ModelConfig) -> usize {
    cfg.attention
        .iter()
        .filter_map(|k| match k {
            AttentionKind::Sliding => None,
            AttentionKind::Hca { ratio } | AttentionKind::Csa { ratio } => Some(*ratio),
        })
        .fold(1, |l, r| l / gcd(l, r) * r)
}

/// The default tokens per block: the smallest multiple of [`ratio_lcm`] that is at least 64
/// (128 for V4-Flash and V4-Pro, whose ratios are 4 and 128).
pub fn default_block_tokens(cfg: &ModelConfig) -> usize {
    let l = ratio_lcm(cfg);
    l * 64usize.div_ceil(l)
}

/// Bytes of one block of each kind, over all layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockBytes {
    pub compressed: usize,
    pub window: usize,
}

pub fn block_bytes(cfg: &ModelConfig, dtype: KvDtype, block_tokens: usize) -> BlockBytes {
    let layers = layer_layouts(cfg, dtype);
    BlockBytes {
        compressed: layers.iter().map(|l| l.compressed_block_bytes(block_tokens)).sum(),
        window: layers.iter().map(|l| l.window_block_bytes(block_tokens)).sum(),
    }
}

/// Whether the model has any compressed layer (otherwise there are no compressed blocks).
pub fn has_compressed(cfg: &ModelConfig) -> bool {
    cfg.attention.iter().any(|k| *k != AttentionKind::Sliding)
}

/// Pages `first..=last` whose window blocks a sequence holds after `n ≥ 1` tokens: those with
/// positions the next query's window reaches, and the page of the last token (its carry).
pub fn held_window_pages(n: usize, window: usize, block_tokens: usize) -> std::ops::RangeInclusive<usize> {
    let lo = n.saturating_sub(window.saturating_sub(1)).min(n - 1);
    lo / block_tokens..=(n - 1) / block_tokens
}

/// A sequence's state after `n` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceFootprint {
    pub compressed_blocks: usize,
    pub window_blocks: usize,
    /// Bytes of the blocks it holds (what the pool reserves for it).
    pub held_bytes: usize,
    /// Bytes of the rows it has written into compressed blocks (entries and indexer keys only:
    /// the per-token cost of the format, without block rounding).
    pub compressed_row_bytes: usize,
}

pub fn sequence_footprint(cfg: &ModelConfig, dtype: KvDtype, block_tokens: usize, n: usize) -> SequenceFootprint {
    if n == 0 {
        return SequenceFootprint { compressed_blocks: 0, window_blocks: 0, held_bytes: 0, compressed_row_bytes: 0 };
    }
    let bytes = block_bytes(cfg, dtype, block_tokens);
    let compressed_blocks = if has_compressed(cfg) { n.div_ceil(block_tokens) } else { 0 };
    let window_blocks = held_window_pages(n, cfg.sliding_window, block_tokens).count();
    let compressed_row_bytes = layer_layouts(cfg, dtype)
        .iter()
        .map(|l| match l.compressor {
            None => 0,
            Some(c) => {
                let e = n / c.ratio;
                e * l.attn_format.row_bytes(l.head_dim) + l.indexer.map_or(0, |(ic, f)| e * f.row_bytes(ic.dim))
            }
        })
        .sum();
    SequenceFootprint {
        compressed_blocks,
        window_blocks,
        held_bytes: compressed_blocks * bytes.compressed + window_blocks * bytes.window,
        compressed_row_bytes,
    }
}
