//! Counters the engine publishes after every step (read by `/metrics`).

/// A snapshot of the engine's state and totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests in the batch (prefilling or decoding).
    pub running: usize,
    /// Requests queued, not yet admitted, and preempted requests waiting to be fed again.
    pub waiting: usize,
    /// Of `waiting`, those preempted.
    pub preempted: usize,
    /// Blocks held by sequences, and blocks free or evictable, of each kind.
    pub compressed_blocks_used: usize,
    pub compressed_blocks_free: usize,
    pub window_blocks_used: usize,
    pub window_blocks_free: usize,
    /// Prompt tokens admitted and tokens generated since start.
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    /// Prompt tokens looked up in the prefix cache, and those found (hit rate = hits / queries).
    pub prefix_cache_queries_total: u64,
    pub prefix_cache_hits_total: u64,
    /// Model steps run, and requests finished / cancelled / failed.
    pub steps_total: u64,
    pub requests_finished_total: u64,
    pub requests_cancelled_total: u64,
    pub requests_failed_total: u64,
    /// Requests preempted (blocks released, recomputed later) to let older ones continue.
    pub preemptions_total: u64,
    /// Speculative decoding: tokens the MTP block drafted, and those the main model accepted
    /// (vLLM's `spec_decode_num_draft_tokens` / `num_accepted_tokens`).
    pub spec_draft_tokens_total: u64,
    pub spec_accepted_tokens_total: u64,
}

/// The sum of two ranks' counters (a data-parallel engine's handle adds its ranks').
impl std::ops::Add for EngineStats {
    type Output = EngineStats;

    fn add(self, o: EngineStats) -> EngineStats {
        EngineStats {
            running: self.running + o.running,
            waiting: self.waiting + o.waiting,
            preempted: self.preempted + o.preempted,
            compressed_blocks_used: self.compressed_blocks_used + o.compressed_blocks_used,
            compressed_blocks_free: self.compressed_blocks_free + o.compressed_blocks_free,
            window_blocks_used: self.window_blocks_used + o.window_blocks_used,
            window_blocks_free: self.window_blocks_free + o.window_blocks_free,
            prompt_tokens_total: self.prompt_tokens_total + o.prompt_tokens_total,
            generation_tokens_total: self.generation_tokens_total + o.generation_tokens_total,
            prefix_cache_queries_total: self.prefix_cache_queries_total + o.prefix_cache_queries_total,
            prefix_cache_hits_total: self.prefix_cache_hits_total + o.prefix_cache_hits_total,
            steps_total: self.steps_total + o.steps_total,
            requests_finished_total: self.requests_finished_total + o.requests_finished_total,
            requests_cancelled_total: self.requests_cancelled_total + o.requests_cancelled_total,
            requests_failed_total: self.requests_failed_total + o.requests_failed_total,
            preemptions_total: self.preemptions_total + o.preemptions_total,
            spec_draft_tokens_total: self.spec_draft_tokens_total + o.spec_draft_tokens_total,
            spec_accepted_tokens_total: self.spec_accepted_tokens_total + o.spec_accepted_tokens_total,
        }
    }
}
