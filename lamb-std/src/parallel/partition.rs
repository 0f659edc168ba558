//! How a step's work is cut among threads.
//!
//! The element ranges of all layers, laid end to end, are cut into one contiguous range per
//! thread of about equal size. Cuts inside a layer fall on multiples of [`BLOCK`], so every
//! block's sum is computed whole by one thread and the sums are added in block order by the
//! caller: the result does not depend on the thread count. Small layers are never cut; they
//! are packed together into the same thread's range.

use lamb_core::BLOCK;

/// A contiguous element range `[start, end)` of layer `layer`, assigned to thread `thread`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) layer: usize,
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) thread: usize,
}

/// Cuts layers of lengths `lens` among `threads` threads. Pieces come in layer order, and
/// within a layer in element order; each thread's pieces are consecutive. O(layers +
/// threads).
pub(crate) fn partition<I>(lens: I, threads: usize) -> Vec<Piece>
where
    I: ExactSizeIterator<Item = usize> + Clone,
{
    let threads = threads.max(1);
    let total: usize = lens.clone().sum();
    let target = total.div_ceil(threads).max(1);
    let mut pieces = Vec::with_capacity(lens.len() + threads);
    let (mut thread, mut filled) = (0, 0);
    for (layer, len) in lens.enumerate() {
        let mut start = 0;
        loop {
            let remaining = len - start;
            let room = target.saturating_sub(filled);
            if remaining <= room || thread == threads - 1 {
                pieces.push(Piece {
                    layer,
                    start,
                    end: len,
                    thread,
                });
                filled += remaining;
                break;
            }
            let cut = start + room / BLOCK * BLOCK;
            if cut > start {
                pieces.push(Piece {
                    layer,
                    start,
                    end: cut,
                    thread,
                });
                start = cut;
            }
            thread += 1;
            filled = 0;
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(lens: &[usize], threads: usize) {
        let pieces = partition(lens.iter().copied(), threads);
        // Every element of every layer exactly once, in order, cuts on block boundaries.
        for (layer, &len) in lens.iter().enumerate() {
            let mine: Vec<_> = pieces.iter().filter(|p| p.layer == layer).collect();
            assert_eq!(mine.first().map_or(0, |p| p.start), 0);
            assert_eq!(mine.last().map_or(0, |p| p.end), len);
            for w in mine.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(w[0].end % BLOCK, 0, "cut inside a block");
            }
        }
        // Threads in non-decreasing order, all below `threads`.
        assert!(pieces.windows(2).all(|w| w[0].thread <= w[1].thread));
        assert!(pieces.iter().all(|p| p.thread < threads.max(1)));
    }

    #[test]
    fn covers_every_element_on_block_boundaries() {
        for threads in [1, 2, 3, 8, 64] {
            check(&[], threads);
            check(&[0, 0, 5], threads);
            check(&[1 << 20], threads);
            check(&[1 << 20, 3, 70_000, 1, 0, 2_000_001], threads);
            check(&vec![1024; 1000], threads);
            check(&vec![7; 1000], threads);
        }
    }

    #[test]
    fn balances_a_big_layer() {
        let pieces = partition([1 << 24].into_iter(), 4);
        assert_eq!(pieces.len(), 4);
        assert!(pieces.iter().all(|p| p.end - p.start == 1 << 22));
    }

    #[test]
    fn packs_small_layers() {
        let pieces = partition([1024; 1000].into_iter(), 2);
        assert_eq!(pieces.len(), 1000);
        assert_eq!(pieces.iter().filter(|p| p.thread == 0).count(), 500);
    }
}
