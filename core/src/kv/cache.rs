//! The paged decoding state: device pools allocated once, per-sequence block tables, in-place
//! appends, and prefix reuse.

use std::ops::Range;

use crate::backend::{Backend, CompressorStepOf, DevicePool};
use crate::config::{AttentionKind, ModelConfig};
use crate::error::{Error, Result};
use crate::kv::blocks::{BlockAllocator, BlockId, PageHasher};
use crate::kv::format::{KvDtype, RowFormat};
use crate::kv::layout::{self, BlockBytes, LayerLayout};
use crate::model::batch::Batch;

/// How the pools are sized and stored, chosen at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    pub dtype: KvDtype,
    /// Positions per block; a multiple of every compression ratio.
    pub block_tokens: usize,
    /// Compressed blocks (entries and indexer keys of every layer for one page).
    pub compressed_blocks: usize,
    /// Window blocks (window rows and compressor carry of every layer for one page).
    pub window_blocks: usize,
}

impl KvConfig {
    /// Window blocks one sequence needs while it runs steps of up to `max_step` tokens: the
    /// pages its window reaches back plus those the step's rows land in.
    pub fn window_blocks_per_sequence(cfg: &ModelConfig, block_tokens: usize, max_step: usize) -> usize {
        (cfg.sliding_window.saturating_sub(1) + max_step.max(1)).div_ceil(block_tokens) + 1
    }

    /// Exactly enough for `seqs` sequences of up to `tokens` tokens each, fed in steps of up to
    /// `max_step` tokens, at the default block size.
    pub fn for_sequences(cfg: &ModelConfig, dtype: KvDtype, seqs: usize, tokens: usize, max_step: usize) -> Self {
        let block_tokens = layout::default_block_tokens(cfg);
        let per_seq = if layout::has_compressed(cfg) { tokens.div_ceil(block_tokens) } else { 0 };
        KvConfig {
            dtype,
            block_tokens,
            compressed_blocks: seqs * per_seq,
            window_blocks: seqs * Self::window_blocks_per_sequence(cfg, block_tokens, max_step.min(tokens.max(1))),
        }
    }

    /// As many blocks as `bytes` holds. Window blocks: what `max_seqs` running sequences need,
    /// or an eighth of the budget if that is more, so that the window blocks at recent reuse
    /// points (a chat's earlier prompts) stay cached; the rest compressed blocks. Errors when the
    /// budget cannot hold the running sequences' windows plus one compressed block.
    pub fn for_budget(
        cfg: &ModelConfig,
        dtype: KvDtype,
        bytes: usize,
        max_seqs: usize,
        max_step: usize,
    ) -> Result<Self> {
        let block_tokens = layout::default_block_tokens(cfg);
        let bb = layout::block_bytes(cfg, dtype, block_tokens);
        // Saturating: `--max-num-seqs` is the user's number (a product past usize fits nowhere).
        let needed = max_seqs.max(1).saturating_mul(Self::window_blocks_per_sequence(cfg, block_tokens, max_step));
        let fits =
            bytes.checked_sub(needed.saturating_mul(bb.window)).filter(|r| *r >= bb.compressed || bb.compressed == 0);
        if fits.is_none() {
            let seqs = if max_seqs == 1 { "one sequence".to_string() } else { format!("{max_seqs} sequences") };
            return Err(Error::Input(format!(
                "a KV cache of {} cannot hold the sliding windows of {seqs} ({} in {needed} window blocks) plus one \
                 compressed block ({}); raise --kv-cache-memory",
                human_bytes(bytes),
                human_bytes(needed.saturating_mul(bb.window)),
                human_bytes(bb.compressed)
            )));
        }
        let window_blocks = needed.max(bytes / 8 / bb.window.max(1));
        let rest = bytes - window_blocks * bb.window;
        let compressed_blocks = rest.checked_div(bb.compressed).unwrap_or(0);
        Ok(KvConfig { dtype, block_tokens, compressed_blocks, window_blocks })
    }

    pub fn block_bytes(&self, cfg: &ModelConfig) -> BlockBytes {
        layout::block_bytes(cfg, self.dtype, self.block_tokens)
    }

    /// Device bytes of all pools.
    pub fn total_bytes(&self, cfg: &ModelConfig) -> usize {
        let b = self.block_bytes(cfg);
        self.compressed_blocks * b.compressed + self.window_blocks * b.window
    }

    /// Tokens the compressed blocks can hold in all (None for a sliding-only model: unbounded).
    pub fn token_capacity(&self, cfg: &ModelConfig) -> Option<usize> {
        layout::has_compressed(cfg).then_some(self.compressed_blocks * self.block_tokens)
    }

    fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let lcm = layout::ratio_lcm(cfg);
        if self.block_tokens == 0 || !self.block_tokens.is_multiple_of(lcm) {
            return Err(Error::Input(format!(
                "KV block size {} must be a positive multiple of {lcm} (every compression ratio)",
                self.block_tokens
            )));
        }
        Ok(())
    }
}

/// `1.5 GiB` style.
pub fn human_bytes(b: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// The device pools of one layer.
pub struct LayerPools<B: Backend> {
    pub layout: LayerLayout,
    /// Window rows (rows `0..window_rows`, block b at `b·block_tokens`), then compressed
    /// entries (block b at `window_rows + b·entries_per_block`).
    pub kv: B::Pool,
    /// Rows of the window region: where compressed entries start.
    pub window_rows: usize,
    /// Indexer keys (CSA), block b at `b·entries_per_block`.
    pub index_keys: Option<B::Pool>,
    /// Attention compressor carry, f32: window block b at `b·2R` (R projection rows, then R
    /// score rows).
    pub carry: Option<B::Pool>,
    /// Indexer compressor carry, same layout.
    pub index_carry: Option<B::Pool>,
}

/// One sequence's block tables and what it has been fed.
#[derive(Debug, Default)]
pub struct Sequence {
    /// Tokens processed so far (= the position of the next token).
    pos: usize,
    /// Every token fed, in order (page hashes are computed from them).
    tokens: Vec<u32>,
    /// Compressed block of each page.
    compressed: Vec<BlockId>,
    /// Window block of each page; None for pages the window has left.
    window: Vec<Option<BlockId>>,
    /// Hash of each full page.
    hashes: Vec<u64>,
    /// Set while a step runs: a step that failed leaves the state undefined.
    poisoned: bool,
    /// The first position with rows ([`KvCache::new_sequence_at`]; 0 for every sequence of
    /// the main model).
    first: usize,
    /// Tokens a [`KvCache::rollback`] may take back: the window pages that position's window
    /// reaches stay held (0 unless the sequence decodes speculatively).
    rollback_depth: usize,
}

impl Sequence {
    /// Tokens processed so far (= the position of the next token).
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn compressed_blocks(&self) -> usize {
        self.compressed.len()
    }

    pub fn window_blocks(&self) -> usize {
        self.window.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Keeps the window pages that a rollback of up to `tokens` tokens needs (speculative
    /// decoding). A pool sized with [`KvConfig::for_sequences`] needs `tokens` more in its
    /// `max_step` for this.
    pub fn set_rollback_depth(&mut self, tokens: usize) {
        self.rollback_depth = tokens;
    }

    /// Tokens a rollback may take back ([`set_rollback_depth`](Self::set_rollback_depth)).
    pub fn rollback_depth(&self) -> usize {
        self.rollback_depth
    }
}

/// The compressors' carry of one sequence at one position, copied out of the pools: what a
/// [`KvCache::rollback`] to that position restores (a later step may overwrite it in place).
pub struct CarrySnapshot<B: Backend> {
    pos: usize,
    /// (layer, indexer carry?, pool rows, their values).
    parts: Vec<(usize, bool, B::Index, B::Tensor)>,
}

impl<B: Backend> CarrySnapshot<B> {
    /// The position the snapshot was taken at.
    pub fn pos(&self) -> usize {
        self.pos
    }
}

/// Prefix-cache and occupancy counters (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Prompt tokens looked up for reuse, and those found.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

/// The paged decoding state of every sequence: allocated once, written in place.
pub struct KvCache<B: Backend> {
    pub config: KvConfig,
    pub layers: Vec<LayerPools<B>>,
    compressed: BlockAllocator,
    window: BlockAllocator,
    window_size: usize,
    has_compressed: bool,
    /// Bytes of one block of each kind (for messages).
    block_bytes: BlockBytes,
    /// Keys the page hashes of this cache's prefix index.
    hasher: PageHasher,
    pub stats: CacheStats,
}

impl<B: Backend> KvCache<B> {
    /// Allocates every pool on the device.
    pub fn new(be: &B, cfg: &ModelConfig, config: KvConfig) -> Result<Self> {
        config.validate(cfg)?;
        let bt = config.block_tokens;
        let has_compressed = layout::has_compressed(cfg);
        let compressed_blocks = if has_compressed { config.compressed_blocks } else { 0 };
        let window_rows = config.window_blocks * bt;
        // Rows are addressed with i32 indices (the backends' index type).
        let max_rows = window_rows as u128 + compressed_blocks as u128 * bt as u128;
        if max_rows > i32::MAX as u128 {
            return Err(Error::Input(format!(
                "a KV cache of {} window and {compressed_blocks} compressed blocks has more rows than 32-bit indices \
                 address; lower --kv-cache-memory",
                config.window_blocks
            )));
        }
        let mut layers = vec![];
        for l in layout::layer_layouts(cfg, config.dtype) {
            let epb = l.entries_per_block(bt);
            let kv = be.alloc_pool(window_rows + compressed_blocks * epb, l.head_dim, l.attn_format)?;
            let index_keys = l.indexer.map(|(c, f)| be.alloc_pool(compressed_blocks * epb, c.dim, f)).transpose()?;
            let carry = |c: &layout::CompressorShape| {
                be.alloc_pool(config.window_blocks * 2 * c.carry_rows(), c.width(), RowFormat::F32)
            };
            let carry_pool = l.compressor.as_ref().map(carry).transpose()?;
            let index_carry = l.indexer.as_ref().map(|(c, _)| carry(c)).transpose()?;
            layers.push(LayerPools { layout: l, kv, window_rows, index_keys, carry: carry_pool, index_carry });
        }
        Ok(KvCache {
            config: KvConfig { compressed_blocks, ..config },
            layers,
            compressed: BlockAllocator::new(compressed_blocks),
            window: BlockAllocator::new(config.window_blocks),
            window_size: cfg.sliding_window,
            has_compressed,
            block_bytes: config.block_bytes(cfg),
            hasher: PageHasher::new(),
            stats: CacheStats::default(),
        })
    }

    /// Device bytes of every pool (measured on the pools).
    pub fn device_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let p = |x: &Option<B::Pool>| x.as_ref().map_or(0, |p| p.bytes());
                l.kv.bytes() + p(&l.index_keys) + p(&l.carry) + p(&l.index_carry)
            })
            .sum()
    }

    /// Bytes of the blocks `seq` holds, measured on the pools' row sizes.
    pub fn sequence_bytes(&self, seq: &Sequence) -> usize {
        let bt = self.config.block_tokens;
        let per_row = |p: &B::Pool| p.format().row_bytes(p.width());
        let (mut comp, mut win) = (0, 0);
        for l in &self.layers {
            let epb = l.layout.entries_per_block(bt);
            comp += epb * per_row(&l.kv) + l.index_keys.as_ref().map_or(0, |p| epb * per_row(p));
            win += bt * per_row(&l.kv);
            for c in [&l.carry, &l.index_carry].into_iter().flatten() {
                win += c.rows() / self.config.window_blocks.max(1) * per_row(c);
            }
        }
        seq.compressed_blocks() * comp + seq.window_blocks() * win
    }

    pub fn new_sequence(&self) -> Sequence {
        Sequence::default()
    }

    /// A sequence whose rows start at position `pos`: earlier positions have none, so the
    /// window of its first `window − 1` positions is shorter than a full state's. For the
    /// MTP block after the main sequence reused a cached prefix (whose residual streams it
    /// never saw): its drafts are then a little less informed, which costs acceptance, never
    /// exactness. Its pages do not enter the prefix index.
    ///
    /// Panics on a cache with compressed layers (their compressors would start from nothing).
    pub fn new_sequence_at(&self, pos: usize) -> Sequence {
        assert!(
            !self.has_compressed || pos == 0,
            "new_sequence_at: only sliding-window states can start past position 0"
        );
        Sequence { pos, first: pos, tokens: vec![0; pos], ..Sequence::default() }
    }

    /// (compressed, window) blocks free or evictable now.
    pub fn available_blocks(&self) -> (usize, usize) {
        (self.compressed.available(), self.window.available())
    }

    /// (compressed, window) blocks held by sequences.
    pub fn used_blocks(&self) -> (usize, usize) {
        (self.compressed.used(), self.window.used())
    }

    /// (compressed, window) blocks `seq` needs to be allocated before it can take `tokens` more.
    pub fn blocks_needed(&self, seq: &Sequence, tokens: usize) -> (usize, usize) {
        let bt = self.config.block_tokens;
        let end = seq.pos + tokens;
        if tokens == 0 {
            return (0, 0);
        }
        let comp = if self.has_compressed { end.div_ceil(bt).saturating_sub(seq.compressed.len()) } else { 0 };
        let first = seq.pos / bt;
        let win = (first..end.div_ceil(bt)).filter(|&p| seq.window.get(p).copied().flatten().is_none()).count();
        (comp, win)
    }

    /// Whether `tokens` more tokens of `seq` fit now (a scheduler's admission test).
    pub fn can_append(&self, seq: &Sequence, tokens: usize) -> bool {
        let (c, w) = self.blocks_needed(seq, tokens);
        c <= self.compressed.available() && w <= self.window.available()
    }

    /// Returns every block of `seq` to the pool (cached full pages stay reusable) and empties it.
    pub fn release(&mut self, seq: &mut Sequence) {
        // Last page first: the least recently released blocks are evicted first, and a prefix
        // is only reusable from its first page on, so its head must be the last to go.
        for b in seq.compressed.drain(..).rev() {
            self.compressed.release(b);
        }
        for b in seq.window.drain(..).rev().flatten() {
            self.window.release(b);
        }
        *seq = Sequence { rollback_depth: seq.rollback_depth, ..Sequence::default() };
    }

    /// Attaches to the empty `seq` the longest cached prefix of `prompt` made of whole pages,
    /// leaving at least one token to compute: the compressed blocks of every page, and the
    /// window blocks (window rows and compressor carry) at the reuse point. Returns the tokens
    /// reused (`seq.pos`).
    pub fn reuse_prefix(&mut self, seq: &mut Sequence, prompt: &[u32]) -> Result<usize> {
        if !seq.is_empty() || seq.poisoned || !seq.compressed.is_empty() || seq.window.iter().any(Option::is_some) {
            return Err(Error::Input("prefix reuse needs a fresh sequence: release this one first".into()));
        }
        let bt = self.config.block_tokens;
        self.stats.prefix_queries += prompt.len() as u64;
        let pages = prompt.len().saturating_sub(1) / bt;
        let mut hashes = Vec::with_capacity(pages);
        let mut comp = Vec::with_capacity(pages);
        for j in 0..pages {
            let h = self.hasher.page(hashes.last().copied().unwrap_or(0), &prompt[j * bt..(j + 1) * bt]);
            if self.has_compressed {
                match self.compressed.lookup(h) {
                    Some(b) => comp.push(b),
                    None => break,
                }
            }
            hashes.push(h);
        }
        // The longest k whose window pages are cached too.
        let mut k = hashes.len();
        let window_pages = |k: usize| -> Option<Vec<(usize, BlockId)>> {
            layout::held_window_pages(k * bt, self.window_size, bt)
                .map(|p| self.window.lookup(hashes[p]).map(|b| (p, b)))
                .collect()
        };
        let win = loop {
            if k == 0 {
                return Ok(0);
            }
            if let Some(w) = window_pages(k) {
                break w;
            }
            k -= 1;
        };
        for &b in &comp[..comp.len().min(k)] {
            self.compressed.retain(b);
        }
        seq.compressed = comp[..comp.len().min(k)].to_vec();
        seq.window = vec![None; k];
        for (p, b) in win {
            self.window.retain(b);
            seq.window[p] = Some(b);
        }
        seq.hashes = hashes[..k].to_vec();
        seq.tokens = prompt[..k * bt].to_vec();
        seq.pos = k * bt;
        self.stats.prefix_hits += seq.pos as u64;
        Ok(seq.pos)
    }

    /// Allocates the blocks the step's new positions need, all or none.
    fn allocate_for(&mut self, batch: &Batch, seqs: &mut [&mut Sequence]) -> Result<()> {
        let (mut need_c, mut need_w) = (0, 0);
        for (k, seq) in seqs.iter().enumerate() {
            let (c, w) = self.blocks_needed(seq, batch.seqs[k].len());
            need_c += c;
            need_w += w;
        }
        let (have_c, have_w) = self.available_blocks();
        if need_c > have_c || need_w > have_w {
            let bb = self.block_bytes;
            return Err(Error::Input(format!(
                "the KV cache is full: this step needs {need_c} compressed and {need_w} window blocks but {have_c} and \
                 {have_w} are free (pool: {} compressed blocks of {} tokens, {} each; {} window blocks, {} each); \
                 raise --kv-cache-memory, shorten the context, or run fewer sequences at once",
                self.config.compressed_blocks,
                self.config.block_tokens,
                human_bytes(bb.compressed),
                self.config.window_blocks,
                human_bytes(bb.window),
            )));
        }
        let bt = self.config.block_tokens;
        for (k, seq) in seqs.iter_mut().enumerate() {
            let end = seq.pos + batch.seqs[k].len();
            while self.has_compressed && seq.compressed.len() < end.div_ceil(bt) {
                seq.compressed.push(self.compressed.allocate().expect("counted above"));
            }
            if seq.window.len() < end.div_ceil(bt) {
                seq.window.resize(end.div_ceil(bt), None);
            }
            for p in seq.pos / bt..end.div_ceil(bt) {
                if seq.window[p].is_none() {
                    seq.window[p] = Some(self.window.allocate().expect("counted above"));
                }
            }
        }
        Ok(())
    }

    /// Plans a step: allocates blocks for the new positions and uploads every row index the
    /// layers need. Marks the sequences poisoned until [`finish_step`](Self::finish_step).
    pub fn plan_step(&mut self, be: &B, batch: &Batch, seqs: &mut [&mut Sequence]) -> Result<StepPlan<B>> {
        if let Some(k) = seqs.iter().position(|s| s.poisoned) {
            return Err(Error::Input(format!(
                "sequence {k} is unusable: an earlier step on it failed midway; release it and start again"
            )));
        }
        self.allocate_for(batch, seqs)?;
        for s in seqs.iter_mut() {
            s.poisoned = true;
        }
        let bt = self.config.block_tokens;
        let t = batch.len();
        let win_row = |seq: &Sequence, p: usize| -> i32 {
            let b = seq.window[p / bt].expect("window page held");
            (b as usize * bt + p % bt) as i32
        };
        // Window writes and window keys.
        let mut write = Vec::with_capacity(t);
        let kw = self.window_size.min(batch.positions.iter().map(|p| p + 1).max().unwrap_or(0));
        let mut keys = vec![-1i32; t * kw];
        for (k, seq) in seqs.iter().enumerate() {
            for row in batch.seqs[k].clone() {
                let p = batch.positions[row];
                write.push(win_row(seq, p));
                let lo = (p + 1).saturating_sub(self.window_size).max(seq.first);
                for (i, q) in (lo..=p).enumerate() {
                    keys[row * kw + i] = win_row(seq, q);
                }
            }
        }
        let window_write = be.upload_index(&write, &[t])?;
        let window_keys = be.upload_index(&keys, &[t, kw])?;

        // One plan per compressed layer kind.
        let mut kinds: Vec<(AttentionKind, KindPlan<B>)> = vec![];
        for l in &self.layers {
            let Some(c) = l.layout.compressor else { continue };
            if kinds.iter().any(|(k, _)| *k == l.layout.kind) {
                continue;
            }
            let epb = bt / c.ratio;
            let mut plans = vec![];
            for (k, seq) in seqs.iter().enumerate() {
                let rows = batch.seqs[k].clone();
                let (start, len) = (batch.positions[rows.start], rows.len());
                let end = start + len;
                let entry = |w: usize| -> usize { seq.compressed[w / epb] as usize * epb + w % epb };
                let carry_block = |q: usize| -> usize { seq.window[(q - 1) / bt].expect("carry page held") as usize };
                let (carry_read, carry_write) = upload_carry(be, &carry_rows(&c, start, len, bt, carry_block))?;
                // New entries.
                let (w0, w1) = (start / c.ratio, end / c.ratio);
                let new_entries = if w1 > w0 {
                    let e: Vec<i32> = (w0..w1).map(|w| entry(w) as i32).collect();
                    let kv: Vec<i32> = e.iter().map(|&x| x + l.window_rows as i32).collect();
                    Some((be.upload_index(&kv, &[w1 - w0])?, be.upload_index(&e, &[w1 - w0])?))
                } else {
                    None
                };
                let visible: Vec<usize> = (start..end).map(|p| (p + 1) / c.ratio).collect();
                let key_rows = if l.layout.indexer.is_some() && w1 > 0 {
                    let e: Vec<i32> = (0..w1).map(|w| entry(w) as i32).collect();
                    Some(be.upload_index(&e, &[w1])?)
                } else {
                    None
                };
                plans.push(SeqCompressPlan {
                    rows,
                    start,
                    carry_base: c.carry_start(start),
                    carry_read,
                    carry_write,
                    new_entries,
                    windows_before: w0,
                    key_rows,
                    visible,
                });
            }
            // HCA: every query's window keys, then all its visible entries, written straight
            // into the one index array (a long chunk at a long context makes it large).
            let attn_keys = if l.layout.indexer.is_none() {
                let ke = plans.iter().flat_map(|p| p.visible.iter().copied()).max().unwrap_or(0);
                let width = kw + ke;
                let mut idx = vec![-1i32; t * width];
                for (sp, seq) in plans.iter().zip(seqs.iter()) {
                    for (row, &v) in sp.rows.clone().zip(&sp.visible) {
                        let out = &mut idx[row * width..(row + 1) * width];
                        out[..kw].copy_from_slice(&keys[row * kw..(row + 1) * kw]);
                        for (w, slot) in out[kw..kw + v].iter_mut().enumerate() {
                            *slot = (seq.compressed[w / epb] as usize * epb + w % epb + l.window_rows) as i32;
                        }
                    }
                }
                Some(be.upload_index(&idx, &[t, width])?)
            } else {
                None
            };
            kinds.push((l.layout.kind, KindPlan { seqs: plans, attn_keys }));
        }
        Ok(StepPlan { window_write, window_keys, kinds })
    }

    /// Completes a step planned with [`plan_step`](Self::plan_step) whose layers all ran:
    /// advances the sequences, registers the pages they filled for prefix reuse, and returns
    /// the window blocks their windows have left.
    pub fn finish_step(&mut self, batch: &Batch, seqs: &mut [&mut Sequence]) {
        let bt = self.config.block_tokens;
        for (k, seq) in seqs.iter_mut().enumerate() {
            let rows = batch.seqs[k].clone();
            seq.tokens.extend_from_slice(&batch.tokens[rows.clone()]);
            seq.pos += rows.len();
            while seq.first == 0 && (seq.hashes.len() + 1) * bt <= seq.pos {
                let j = seq.hashes.len();
                let h = self.hasher.page(seq.hashes.last().copied().unwrap_or(0), &seq.tokens[j * bt..(j + 1) * bt]);
                seq.hashes.push(h);
                if let Some(&b) = seq.compressed.get(j) {
                    self.compressed.register(b, h);
                }
                if let Some(Some(b)) = seq.window.get(j) {
                    self.window.register(*b, h);
                }
            }
            // A rollback of `rollback_depth` tokens needs the window reaching back that far.
            let keep = layout::held_window_pages(seq.pos, self.window_size + seq.rollback_depth, bt);
            for p in 0..*keep.start() {
                if let Some(b) = seq.window[p].take() {
                    self.window.release(b);
                }
            }
            seq.poisoned = false;
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// Copies `seq`'s compressor carry at its current position out of the pools, for a
    /// [`rollback`](Self::rollback) to this position after the next step.
    pub fn snapshot_carry(&self, be: &B, seq: &Sequence) -> Result<CarrySnapshot<B>> {
        let bt = self.config.block_tokens;
        let mut parts = vec![];
        if seq.pos > 0 {
            for (i, l) in self.layers.iter().enumerate() {
                let Some(c) = l.layout.compressor else { continue };
                let count = seq.pos - c.carry_start(seq.pos);
                if count == 0 {
                    continue;
                }
                let block = seq.window[(seq.pos - 1) / bt].expect("the page of the last token is held");
                let (r, b) = (c.carry_rows(), block as usize * 2 * c.carry_rows());
                let rows: Vec<i32> = (0..count).chain(r..r + count).map(|j| (b + j) as i32).collect();
                let slots = be.upload_index(&rows, &[rows.len()])?;
                for (index, pool) in [(false, &l.carry), (true, &l.index_carry)] {
                    if let Some(pool) = pool {
                        parts.push((i, index, slots.clone(), be.pool_read(pool, &slots)?));
                    }
                }
            }
        }
        Ok(CarrySnapshot { pos: seq.pos, parts })
    }

    /// The latest position `≤ wanted` that `seq` (advanced by one step since `snap` was
    /// taken) can be rolled back to exactly: `wanted` itself when no compression window of
    /// any layer ends between it and the step's end (the carry there is then a prefix of the
    /// carry the step stored), else the last page end the step crossed (the step stored the
    /// carry there), else the snapshot's position. Every compression ratio divides the page
    /// size, so a page end is a window end for every layer.
    pub fn rollback_point(&self, seq: &Sequence, snap: &CarrySnapshot<B>, wanted: usize) -> usize {
        let (end, bt) = (seq.pos, self.config.block_tokens);
        let last_window_end = self.layers.iter().filter_map(|l| l.layout.compressor).map(|c| end / c.ratio * c.ratio);
        if wanted >= last_window_end.max().unwrap_or(0) {
            return wanted;
        }
        let page_end = wanted / bt * bt;
        page_end.max(snap.pos)
    }

    /// Takes `seq` back to position `q`, taken from [`rollback_point`](Self::rollback_point)
    /// after one step since `snap` was taken (and at most
    /// [`Sequence::set_rollback_depth`] tokens back): the carry is restored when `q` is the
    /// snapshot's position, the block tables keep their blocks (the next steps rewrite the rows
    /// past `q`), and pages that became full after `q` leave the prefix index. The result is
    /// the state the sequence had after `q` tokens.
    pub fn rollback(&mut self, be: &B, seq: &mut Sequence, snap: CarrySnapshot<B>, q: usize) -> Result<()> {
        if seq.poisoned
            || q < snap.pos
            || q > seq.pos
            || seq.pos - q > seq.rollback_depth
            || q != self.rollback_point(seq, &snap, q)
        {
            return Err(Error::Input(format!(
                "cannot roll a sequence at position {} back to {q} (snapshot at {}, rollback depth {})",
                seq.pos, snap.pos, seq.rollback_depth
            )));
        }
        let bt = self.config.block_tokens;
        if q > seq.first && seq.window.get((q - 1) / bt).copied().flatten().is_none() {
            return Err(Error::Input(format!("the window page of position {} is no longer held", q - 1)));
        }
        if q == snap.pos {
            for (i, index, slots, values) in &snap.parts {
                let l = &mut self.layers[*i];
                let pool = if *index { l.index_carry.as_mut() } else { l.carry.as_mut() };
                be.pool_write(pool.expect("snapshot of an existing pool"), slots, values)?;
            }
        }
        for j in q / bt..seq.hashes.len() {
            if let Some(&b) = seq.compressed.get(j) {
                self.compressed.unregister(b);
            }
            if let Some(Some(b)) = seq.window.get(j) {
                self.window.unregister(*b);
            }
        }
        seq.hashes.truncate(q / bt);
        seq.tokens.truncate(q);
        seq.pos = q;
        Ok(())
    }
}

/// Carry-pool rows of one sequence's step over positions `start..start+len` (see
/// [`SeqCompressPlan`]): rows to read `[2c]`, and the snapshot rows (sources in the step's
/// `[carried ++ new]` rows `[n]`, destinations `[2n]`). `carry_block(q)` is the window block
/// whose carry holds the state after q tokens (the block of position q − 1).
pub fn carry_rows(
    c: &layout::CompressorShape,
    start: usize,
    len: usize,
    block_tokens: usize,
    carry_block: impl Fn(usize) -> usize,
) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let r = c.carry_rows();
    let end = start + len;
    // Carry at `start`, from the page of the last token fed.
    let base = c.carry_start(start);
    let count = start - base;
    let read = if count > 0 {
        let b = carry_block(start) * 2 * r;
        (0..count).chain(r..r + count).map(|i| (b + i) as i32).collect()
    } else {
        vec![]
    };
    // Snapshots: at every page end the step crosses, and at its end.
    let mut snaps: Vec<usize> = ((start / block_tokens + 1) * block_tokens..end).step_by(block_tokens).collect();
    snaps.push(end);
    let (mut src, mut dst, mut dst_score) = (vec![], vec![], vec![]);
    for q in snaps {
        let b = carry_block(q) * 2 * r;
        for (i, p) in (c.carry_start(q)..q).enumerate() {
            src.push((p - base) as i32);
            dst.push((b + i) as i32);
            dst_score.push((b + r + i) as i32);
        }
    }
    dst.extend(dst_score);
    (read, src, dst)
}

type CarryIndices<B> = (Option<<B as Backend>::Index>, Option<(<B as Backend>::Index, <B as Backend>::Index)>);

fn upload_carry<B: Backend>(be: &B, (read, src, dst): &(Vec<i32>, Vec<i32>, Vec<i32>)) -> Result<CarryIndices<B>> {
    let read = if read.is_empty() { None } else { Some(be.upload_index(read, &[read.len()])?) };
    let write = if src.is_empty() {
        None
    } else {
        Some((be.upload_index(src, &[src.len()])?, be.upload_index(dst, &[dst.len()])?))
    };
    Ok((read, write))
}

impl<B: Backend> SeqCompressPlan<B> {
    /// The arguments of [`Backend::compressor_step`] for this step of a compressor of `shape`:
    /// `x` the step's tokens `[S, D]`, the compressor's projections and position bias.
    pub fn compressor_step<'a>(
        &'a self,
        shape: &layout::CompressorShape,
        x: &'a B::Tensor,
        wkv: &'a B::Weight,
        wgate: &'a B::Weight,
        ape: &'a B::Tensor,
    ) -> CompressorStepOf<'a, B> {
        crate::backend::CompressorStep {
            x,
            wkv,
            wgate,
            ape,
            ratio: shape.ratio,
            overlap: shape.overlap,
            dim: shape.dim,
            start: self.start,
            carry_base: self.carry_base,
            carry_read: self.carry_read.as_ref(),
            carry_write: self.carry_write.as_ref().map(|(src, dst)| (src, dst)),
        }
    }

    /// The plan of a lone compressor (no attention, no indexer) for positions
    /// `start..start+len` of a sequence whose carry lives in block 0 of a carry pool of
    /// `2·c.carry_rows()` rows: what a unit test of the compressor needs.
    pub fn lone(be: &B, c: &layout::CompressorShape, start: usize, len: usize) -> Result<Self> {
        let (carry_read, carry_write) = upload_carry(be, &carry_rows(c, start, len, usize::MAX / 2, |_| 0))?;
        Ok(SeqCompressPlan {
            rows: 0..len,
            start,
            carry_base: c.carry_start(start),
            carry_read,
            carry_write,
            new_entries: None,
            windows_before: start / c.ratio,
            key_rows: None,
            visible: vec![],
        })
    }
}

/// Everything the layers need to read and write the pools in one step, uploaded once and
/// shared by every layer of the same kind.
pub struct StepPlan<B: Backend> {
    /// Window-region row of every token of the step `[T]`.
    pub window_write: B::Index,
    /// Each query's sliding-window keys as kv-pool rows `[T, Kw]` (`-1` padded).
    pub window_keys: B::Index,
    /// One plan per compressed layer kind.
    pub kinds: Vec<(AttentionKind, KindPlan<B>)>,
}

impl<B: Backend> StepPlan<B> {
    pub fn kind(&self, kind: AttentionKind) -> Result<&KindPlan<B>> {
        self.kinds
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p)
            .ok_or_else(|| Error::Input(format!("no step plan for {kind:?} layers")))
    }
}

pub struct KindPlan<B: Backend> {
    /// Per sequence of the batch.
    pub seqs: Vec<SeqCompressPlan<B>>,
    /// HCA: each query's window keys then every entry it may see `[T, Kw + Ke]`; CSA: None
    /// (the indexer picks the entries).
    pub attn_keys: Option<B::Index>,
}

/// One sequence's compressor work in a step (the same for a CSA layer's attention and
/// indexer compressors: both have ratio m and overlap, so the same carry rows).
pub struct SeqCompressPlan<B: Backend> {
    /// Rows of the batch.
    pub rows: Range<usize>,
    pub start: usize,
    /// Position of the first carried row (the carry holds positions `carry_base..start`).
    pub carry_base: usize,
    /// Carry-pool rows to read `[2c]`: c projection rows, then c score rows (None when c = 0).
    pub carry_read: Option<B::Index>,
    /// Carry snapshots: rows of the step's `[carried ++ new]` projections `[n]`, and the
    /// carry-pool rows they go to `[2n]` (projections, then scores).
    pub carry_write: Option<(B::Index, B::Index)>,
    /// Rows for the entries this step completes: in the kv pool `[W]` and in the indexer-key
    /// pool `[W]`.
    pub new_entries: Option<(B::Index, B::Index)>,
    /// Complete windows before the step (the first new entry's number).
    pub windows_before: usize,
    /// CSA: indexer-key rows of every entry after the step `[N]`.
    pub key_rows: Option<B::Index>,
    /// Per query, how many entries it may see (`⌊(p + 1) / m⌋`).
    pub visible: Vec<usize>,
}
