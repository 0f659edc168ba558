//! The shards: the model's layers laid end to end, cut into one contiguous range per rank
//! on block boundaries ([`BLOCK`] elements of a layer, or a layer's end), balanced by
//! elements. A layer may span ranks. Because every cut is on a block boundary, every
//! block of phase 1 and of the gradient norm lies on exactly one rank, and the ranks'
//! blocks, laid end to end in rank order, are the model's blocks in order.

use lamb_std::lamb_core::BLOCK;

/// One rank's part of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) layer: usize,
    /// First element, in the layer (a multiple of [`BLOCK`]).
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// Where every layer and every rank's shard lies.
#[derive(Clone, Debug)]
pub(crate) struct Shards {
    /// Per layer: its first element and first block in the model laid end to end.
    pub(crate) layer_flat: Vec<usize>,
    pub(crate) layer_block: Vec<usize>,
    /// Per rank: its pieces, in layer order.
    pub(crate) pieces: Vec<Vec<Piece>>,
    /// Per rank: its first block and number of blocks.
    pub(crate) blocks: Vec<(usize, usize)>,
    /// Per rank: its first element and number of elements.
    pub(crate) elems: Vec<(usize, usize)>,
    pub(crate) total_blocks: usize,
}

impl Shards {
    /// The shards of layers of lengths `lens` among `world` ranks.
    pub(crate) fn new(lens: &[usize], world: usize) -> Shards {
        let (mut layer_flat, mut layer_block) = (Vec::new(), Vec::new());
        let (mut flat, mut block) = (0usize, 0usize);
        for &len in lens {
            layer_flat.push(flat);
            layer_block.push(block);
            flat += len;
            block += len.div_ceil(BLOCK);
        }
        let (total, total_blocks) = (flat, block);
        // Cut k at the block boundary nearest to k/world of the elements.
        let mut cuts = vec![0usize];
        for k in 1..world {
            let target = (total as u128 * k as u128 / world as u128) as usize;
            let cut = snap(lens, &layer_flat, target).max(*cuts.last().unwrap_or(&0));
            cuts.push(cut);
        }
        cuts.push(total);
        let block_at = |c: usize| -> usize {
            match layer_flat.iter().rposition(|&s| s <= c && c < total) {
                Some(l) => layer_block[l] + (c - layer_flat[l]) / BLOCK,
                None => total_blocks,
            }
        };
        let (mut pieces, mut blocks, mut elems) = (Vec::new(), Vec::new(), Vec::new());
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let mine = lens.iter().enumerate().filter_map(|(layer, &len)| {
                let s = layer_flat[layer];
                let (lo, hi) = (a.max(s), b.min(s + len));
                (lo < hi).then(|| Piece {
                    layer,
                    start: lo - s,
                    len: hi - lo,
                })
            });
            pieces.push(mine.collect());
            let (ba, bb) = (block_at(a), block_at(b));
            blocks.push((ba, bb - ba));
            elems.push((a, b - a));
        }
        Shards {
            layer_flat,
            layer_block,
            pieces,
            blocks,
            elems,
            total_blocks,
        }
    }
}

/// The block boundary nearest to element `target` of the model (a layer's start and end
/// are boundaries).
fn snap(lens: &[usize], layer_flat: &[usize], target: usize) -> usize {
    for (l, &len) in lens.iter().enumerate() {
        let s = layer_flat[l];
        if target < s + len {
            let o = target - s;
            let k = (o + BLOCK / 2) / BLOCK * BLOCK;
            return s + k.min(len);
        }
    }
    layer_flat
        .last()
        .map_or(0, |s| s + lens.last().copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element is on exactly one rank, every cut on a block boundary, the blocks
    /// of the ranks are contiguous, and the shards are balanced to within a block.
    #[test]
    fn shards_cover_the_model_on_block_boundaries() {
        let lens = [5000, 3, 100_000, 1024, 7, 40_000];
        let total: usize = lens.iter().sum();
        for world in 1..=9 {
            let s = Shards::new(&lens, world);
            let mut next = 0;
            let mut next_block = 0;
            let mut covered = vec![0usize; lens.len()];
            for r in 0..world {
                let (a, n) = s.elems[r];
                assert_eq!(a, next);
                next += n;
                assert_eq!(s.blocks[r].0, next_block);
                next_block += s.blocks[r].1;
                let blocks: usize = s.pieces[r].iter().map(|p| p.len.div_ceil(BLOCK)).sum();
                assert_eq!(blocks, s.blocks[r].1, "world {world} rank {r}");
                for p in &s.pieces[r] {
                    assert_eq!(p.start % BLOCK, 0);
                    assert_eq!(p.start, covered[p.layer]);
                    covered[p.layer] += p.len;
                }
                assert!(n.abs_diff(total / world) <= BLOCK * 2, "{world} {r} {n}");
            }
            assert_eq!(next, total);
            assert_eq!(next_block, s.total_blocks);
            assert_eq!(covered, lens);
        }
    }
}
