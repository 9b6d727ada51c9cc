//! The KV block manager: which cache blocks each sequence owns.
//!
//! Every worker holds the same number of blocks per layer; the coordinator alone decides
//! which sequence owns which block and sends each sequence's block table with every step.

/// Free and used KV-cache blocks.
#[derive(Debug)]
pub struct BlockManager {
    block_tokens: usize,
    total: usize,
    free: Vec<u32>,
}

impl BlockManager {
    /// `total` blocks of `block_tokens` tokens each, all free.
    pub fn new(total: usize, block_tokens: usize) -> Self {
        BlockManager {
            block_tokens,
            total,
            // Popped from the back: low block ids are handed out first.
            free: (0..total as u32).rev().collect(),
        }
    }

    /// Blocks needed to hold `tokens` token slots.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Blocks in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks in use.
    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at).into_iter().rev().collect())
    }

    /// Returns blocks to the free list.
    pub fn release(&mut self, blocks: Vec<u32>) {
        debug_assert!(blocks.iter().all(|&b| (b as usize) < self.total));
        self.free.extend(blocks.into_iter().rev());
        debug_assert!(self.free.len() <= self.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_reuses_released_blocks() {
        let mut m = BlockManager::new(5, 16);
        assert_eq!(m.blocks_for(0), 0);
        assert_eq!(m.blocks_for(16), 1);
        assert_eq!(m.blocks_for(17), 2);
        let a = m.allocate(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(m.allocate(3).is_none(), "only 2 left");
        let b = m.allocate(2).unwrap();
        assert_eq!(m.used(), 5);
        m.release(a);
        assert_eq!(m.used(), 2);
        let c = m.allocate(3).unwrap();
        let mut all: Vec<u32> = b.iter().chain(&c).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "no block is handed out twice");
    }
}
