//! A block allocator with reference counts and a prefix-cache index (vLLM's block manager in
//! miniature): blocks that hold a full page of some token prefix are registered under the
//! page's hash; when their last user releases them they stay cached, evictable in least-recently
//! released order, until the space is needed.

use std::collections::{BTreeMap, HashMap};

/// Identifies one block of a pool.
pub type BlockId = u32;

#[derive(Debug)]
pub struct BlockAllocator {
    refs: Vec<u32>,
    /// Blocks with no users and no cached content, ready to hand out.
    free: Vec<BlockId>,
    /// The page hash a block is registered under.
    hash_of: Vec<Option<u64>>,
    by_hash: HashMap<u64, BlockId>,
    /// Cached blocks with no users, by release tick (oldest first): eviction order.
    evictable: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    tick: u64,
}

impl BlockAllocator {
    pub fn new(blocks: usize) -> Self {
        BlockAllocator {
            refs: vec![0; blocks],
            free: (0..blocks as BlockId).rev().collect(),
            hash_of: vec![None; blocks],
            by_hash: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; blocks],
            tick: 0,
        }
    }

    /// Total blocks.
    pub fn capacity(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that [`allocate`](Self::allocate) can hand out now (free plus evictable cached).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn used(&self) -> usize {
        self.capacity() - self.available()
    }

    /// Cached blocks nobody holds.
    pub fn cached_idle(&self) -> usize {
        self.evictable.len()
    }

    /// A block for one user: a free one, else the least recently released cached one (which
    /// leaves the prefix index). None when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One more user of `b` (a prefix-cache hit).
    pub fn retain(&mut self, b: BlockId) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.evictable.remove(&self.released_at[i]);
        }
        self.refs[i] += 1;
    }

    /// One user fewer; a block nobody holds becomes evictable if cached, else free.
    pub fn release(&mut self, b: BlockId) {
        let i = b as usize;
        assert!(self.refs[i] > 0, "block {b} released more often than held");
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            if self.hash_of[i].is_some() {
                self.tick += 1;
                self.released_at[i] = self.tick;
                self.evictable.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Registers `b` (held, full) as the block of the page with hash `h`, unless that page is
    /// cached already (then `b` stays private and is freed with its sequence).
    pub fn register(&mut self, b: BlockId, h: u64) {
        if self.by_hash.contains_key(&h) || self.hash_of[b as usize].is_some() {
            return;
        }
        self.hash_of[b as usize] = Some(h);
        self.by_hash.insert(h, b);
    }

    /// Takes `b` out of the prefix index (its page is about to be rewritten: a speculative
    /// step's rejected tokens are rolled back). Does nothing when `b` is not the indexed block.
    pub fn unregister(&mut self, b: BlockId) {
        if let Some(h) = self.hash_of[b as usize].take() {
            if self.by_hash.get(&h) == Some(&b) {
                self.by_hash.remove(&h);
            }
        }
    }

    /// The cached block of the page with hash `h`.
    pub fn lookup(&self, h: u64) -> Option<BlockId> {
        self.by_hash.get(&h).copied()
    }

    pub fn refs(&self, b: BlockId) -> u32 {
        self.refs[b as usize]
    }
}

/// Hashes of pages for prefix reuse: SipHash-1-3 (std's `RandomState`) under keys drawn at
/// random for each cache. Equal hashes mean equal prefixes at equal positions up to 64-bit
/// collisions, and because the keys are secret a client of a server cannot craft a prompt whose
/// page collides with another client's (which an unkeyed hash such as FNV would allow: the
/// colliding prompt would be served the other prompt's decoding state).
#[derive(Debug, Clone, Default)]
pub struct PageHasher {
    keys: std::collections::hash_map::RandomState,
}

impl PageHasher {
    pub fn new() -> Self {
        PageHasher::default()
    }

    /// The hash of page `tokens` following a page with hash `prev` (0 for the first page).
    pub fn page(&self, prev: u64, tokens: &[u32]) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one((prev, tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_reused_then_evicted_oldest_first() {
        let mut a = BlockAllocator::new(3);
        let (x, y, z) = (a.allocate().unwrap(), a.allocate().unwrap(), a.allocate().unwrap());
        assert_eq!(a.allocate(), None);
        a.register(x, 10);
        a.register(y, 20);
        a.release(x);
        a.release(y);
        a.release(z); // not cached: free
        assert_eq!((a.available(), a.cached_idle()), (3, 2));
        // A hit takes a cached block back out of the eviction order.
        assert_eq!(a.lookup(20), Some(y));
        a.retain(y);
        assert_eq!(a.refs(y), 1);
        // The free block goes first, then the oldest cached one (x), whose hash is forgotten.
        assert_eq!(a.allocate(), Some(z));
        assert_eq!(a.allocate(), Some(x));
        assert_eq!(a.lookup(10), None);
        assert_eq!(a.lookup(20), Some(y));
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn a_page_is_registered_once() {
        let mut a = BlockAllocator::new(2);
        let (x, y) = (a.allocate().unwrap(), a.allocate().unwrap());
        a.register(x, 7);
        a.register(y, 7);
        assert_eq!(a.lookup(7), Some(x));
        a.release(y);
        assert_eq!(a.cached_idle(), 0, "the duplicate is freed, not cached");
    }

    #[test]
    fn page_hashes_chain() {
        let h = PageHasher::new();
        let a = h.page(0, &[1, 2, 3]);
        assert_ne!(a, h.page(0, &[1, 2, 4]));
        assert_ne!(h.page(a, &[5]), h.page(h.page(0, &[1, 2, 4]), &[5]));
        assert_eq!(h.page(a, &[5]), h.page(h.page(0, &[1, 2, 3]), &[5]));
    }

    #[test]
    fn page_hashes_are_keyed_per_cache() {
        // Two caches hash the same page differently (equal with probability 2^-64), so a hash
        // seen from one process says nothing about another's.
        assert_ne!(PageHasher::new().page(0, &[1, 2, 3]), PageHasher::new().page(0, &[1, 2, 3]));
    }
}
