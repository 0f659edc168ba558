//! Whole-model memory rooflines: the same-run floor of the interleaved comparison's ratio.
//!
//! `peers/interleaved.py` reports lamb-std ÷ torch fused AdamW per round. lamb-std's step is
//! two passes by design (phase 1 reads p, g, m, v and writes nothing; phase 2 reads them again
//! and writes m, v, p: 44 B/param), torch's fused AdamW one pass (28 B/param), so part of the
//! ratio is the design's traffic and not the code. To know how much, the run also steps two
//! *roofline models*: the [`crate::roofline`] loops (trivial arithmetic, the compiler's widest
//! vectorization) over the same tensors, with the same thread count, interleaved round by
//! round with the real implementations. `roof44 / roof28` from the same rounds is then the
//! ratio that the traffic alone would give, on that machine at that time.
//!
//! | kind      | `none` (no clipping)                               | `clip` (global clipping at 1.0)                          |
//! |-----------|----------------------------------------------------|----------------------------------------------------------|
//! | `roof44`  | pass A read p,g,m,v (reduce), join; pass B read p,g,m,v, write m,v,p, backwards: 44 B | first a sum of squares of g, backwards, join: 48 B |
//! | `roof28`  | one pass read p,g,m,v, write m,v,p: 28 B           | sum of squares of g, join, g ← g/√(sum), join, then the 28 B pass: 40 B |
//!
//! `roof44` follows lamb-std's step: its clipping pass and phase 2 walk a thread's layers
//! backwards, and its phases are separated by a barrier. `roof28` follows torch's
//! `clip_grad_norm_` (a norm pass, an in-place scale that torch applies even when the factor
//! is 1) and fused AdamW. The scale is `1/‖g‖`, so after the first clipped step g has norm 1
//! and stays bounded however often it is scaled.
//!
//! Parameters and gradients are [`crate::model_layer_buffers`], the same buffers lamb-std's
//! worker steps; m and v are aligned buffers of the same sizes filled by [`crate::fill`]
//! (bounded, never zero). The concatenation of all tensors is split into `threads`
//! contiguous ranges of (almost) equal element counts, boundaries at multiples of 16
//! elements (64 B), so each thread has a list of (tensor, start..end) pieces. Each pass is a
//! broadcast on a rayon pool of `threads` workers, one list per worker, all finished before
//! the next pass: the pool lives as long as the model, as lamb-std's lives as long as the
//! optimizer, so a pass wakes workers rather than spawning threads.

use std::ops::Range;
use std::sync::Mutex;

use lamb_std::buffer::AlignedBuf;

use crate::roofline::Roofline;
use crate::{fill, model_layer_buffers};

/// Which traffic a [`RoofModel`] step moves (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoofKind {
    /// lamb-std's two passes: 44 B/param, 48 B with the clipping norm pass.
    Roof44,
    /// torch's single pass: 28 B/param, 40 B with `clip_grad_norm_`'s norm and scale passes.
    Roof28,
}

impl RoofKind {
    /// The name the interleaved runner uses (`roof44`, `roof28`).
    pub fn name(self) -> &'static str {
        match self {
            RoofKind::Roof44 => "roof44",
            RoofKind::Roof28 => "roof28",
        }
    }

    /// The kind named `name`, if any.
    pub fn parse(name: &str) -> Option<RoofKind> {
        [RoofKind::Roof44, RoofKind::Roof28]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// One thread's share of one tensor: `(tensor index, element range)`.
pub type PieceRange = (usize, Range<usize>);

/// Splits the concatenation of tensors of lengths `lens` into `threads` contiguous ranges of
/// (almost) equal element counts, boundaries rounded down to multiples of 16 elements, and
/// returns each range as its pieces in tensor order (no empty piece; a range may be empty
/// when there are fewer than 16 elements per thread).
pub fn partition(lens: &[usize], threads: usize) -> Vec<Vec<PieceRange>> {
    let total: usize = lens.iter().sum();
    let bound = |k: usize| {
        if k >= threads {
            total
        } else {
            (k as u128 * total as u128 / threads as u128) as usize / 16 * 16
        }
    };
    (0..threads)
        .map(|k| {
            let (lo, hi) = (bound(k), bound(k + 1));
            let mut pieces = Vec::new();
            let mut start = 0;
            for (t, &len) in lens.iter().enumerate() {
                let (a, b) = (lo.max(start), hi.min(start + len));
                if a < b {
                    pieces.push((t, a - start..b - start));
                }
                start += len;
            }
            pieces
        })
        .collect()
}

/// One thread's piece of one tensor: the four arrays' elements in its range.
struct Piece<'a> {
    p: &'a mut [f32],
    g: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
}

/// A whole model stepped by roofline loops instead of an optimizer (module docs).
pub struct RoofModel {
    kind: RoofKind,
    roof: Roofline,
    /// p, g, m, v of every tensor.
    arrays: [Vec<AlignedBuf>; 4],
    ranges: Vec<Vec<PieceRange>>,
    /// One worker per range, kept alive between passes as lamb-std's pool is: a pass
    /// wakes its workers rather than spawning threads.
    pool: rayon::ThreadPool,
}

impl RoofModel {
    /// Allocates and fills the tensors of lengths `lens` and partitions them over `threads`.
    pub fn new(kind: RoofKind, lens: &[usize], threads: usize) -> Result<RoofModel, String> {
        if threads == 0 {
            return Err("threads must be at least 1".into());
        }
        let mut arrays: [Vec<AlignedBuf>; 4] = Default::default();
        for (i, &len) in lens.iter().enumerate() {
            let (p, g) = model_layer_buffers(i, len);
            // Seeds apart from the params' and grads' (2i + 1, 2i + 2).
            let (mut m, mut v) = (AlignedBuf::zeroed(len), AlignedBuf::zeroed(len));
            fill(&mut m, (1 << 32) + 2 * i as u64 + 1, 0.01, 0.0);
            fill(&mut v, (1 << 32) + 2 * i as u64 + 2, 0.01, 0.0);
            for (a, b) in arrays.iter_mut().zip([p, g, m, v]) {
                a.push(b);
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| format!("thread pool: {e}"))?;
        Ok(RoofModel {
            kind,
            roof: Roofline::detect(),
            arrays,
            ranges: partition(lens, threads),
            pool,
        })
    }

    /// Which compilation of the loops runs (`avx512f`, `avx2` or `baseline`).
    pub fn isa(&self) -> &'static str {
        self.roof.isa
    }

    /// One step, with or without the clipping passes; returns the passes' reductions (a
    /// checksum to keep, so that no pass is dead code).
    pub fn step(&mut self, clip: bool) -> f32 {
        let (kind, roof, pool) = (self.kind, self.roof, &self.pool);
        let mut parts = pieces(&mut self.arrays, &self.ranges);
        let sum_sq = |ps: &mut [Piece<'_>], backwards: bool| -> f32 {
            if backwards {
                ps.iter().rev().map(|x| roof.sum_sq(x.g)).sum()
            } else {
                ps.iter().map(|x| roof.sum_sq(x.g)).sum()
            }
        };
        let rw43 = |ps: &mut [Piece<'_>], backwards: bool| -> f32 {
            let mut go = |x: &mut Piece<'_>| roof.rw43(x.p, x.g, x.m, x.v);
            if backwards {
                ps.iter_mut().rev().map(&mut go).sum()
            } else {
                ps.iter_mut().map(&mut go).sum()
            }
        };
        let mut check = 0.0;
        match kind {
            RoofKind::Roof44 => {
                if clip {
                    check += on_threads(pool, &mut parts, |ps| sum_sq(ps, true));
                }
                check += on_threads(pool, &mut parts, |ps| {
                    ps.iter().map(|x| roof.read4(x.p, x.g, x.m, x.v)).sum()
                });
                check += on_threads(pool, &mut parts, |ps| rw43(ps, true));
            }
            RoofKind::Roof28 => {
                if clip {
                    let total = on_threads(pool, &mut parts, |ps| sum_sq(ps, false));
                    let s = if total > 0.0 && total.is_finite() {
                        1.0 / total.sqrt()
                    } else {
                        1.0
                    };
                    on_threads(pool, &mut parts, |ps| {
                        ps.iter_mut().for_each(|x| roof.scale(x.g, s));
                        0.0
                    });
                    check += total;
                }
                check += on_threads(pool, &mut parts, |ps| rw43(ps, false));
            }
        }
        check
    }
}

/// Each thread's pieces (`ranges`) as disjoint mutable slices of the four arrays.
fn pieces<'a>(
    arrays: &'a mut [Vec<AlignedBuf>; 4],
    ranges: &[Vec<PieceRange>],
) -> Vec<Vec<Piece<'a>>> {
    let [p, g, m, v] = arrays;
    // What is left of each tensor's arrays, and where that rest starts.
    let mut rest: Vec<([&mut [f32]; 4], usize)> = p
        .iter_mut()
        .zip(g.iter_mut())
        .zip(m.iter_mut())
        .zip(v.iter_mut())
        .map(|(((p, g), m), v)| ([&mut p[..], &mut g[..], &mut m[..], &mut v[..]], 0))
        .collect();
    let mut parts = Vec::with_capacity(ranges.len());
    for ranges in ranges {
        let mut part = Vec::with_capacity(ranges.len());
        for (t, r) in ranges {
            let (arrays, at) = &mut rest[*t];
            let [p, g, m, v] = arrays.each_mut().map(|a| take(a, r.start - *at, r.len()));
            *at = r.end;
            part.push(Piece { p, g, m, v });
        }
        parts.push(part);
    }
    parts
}

/// Splits `len` elements off `rest` after skipping `skip`, leaving the remainder in `rest`.
fn take<'a>(rest: &mut &'a mut [f32], skip: usize, len: usize) -> &'a mut [f32] {
    let (head, tail) = std::mem::take(rest)[skip..].split_at_mut(len);
    *rest = tail;
    head
}

/// Runs `f` on every thread's pieces at once, one pool worker per list (`parts` has one
/// list per worker), and returns the sum of the results in list order once all have
/// finished.
fn on_threads<'a, F>(pool: &rayon::ThreadPool, parts: &mut [Vec<Piece<'a>>], f: F) -> f32
where
    F: Fn(&mut [Piece<'a>]) -> f32 + Sync,
{
    debug_assert_eq!(parts.len(), pool.current_num_threads());
    // Each worker takes its own list; the locks are never contended.
    let lists: Vec<Mutex<&mut Vec<Piece<'a>>>> = parts.iter_mut().map(Mutex::new).collect();
    pool.broadcast(|ctx| {
        let mut list = lists[ctx.index()].lock().unwrap_or_else(|e| e.into_inner());
        f(&mut list[..])
    })
    .into_iter()
    .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_covers_every_element_once_in_equal_shares() {
        let lens = [5, 1000, 3, 0, 77, 4096];
        for threads in 1..=7 {
            let parts = partition(&lens, threads);
            assert_eq!(parts.len(), threads);
            let flat: Vec<(usize, usize)> = parts
                .iter()
                .flatten()
                .flat_map(|(t, r)| r.clone().map(move |e| (*t, e)))
                .collect();
            let all: Vec<(usize, usize)> = lens
                .iter()
                .enumerate()
                .flat_map(|(t, &n)| (0..n).map(move |e| (t, e)))
                .collect();
            assert_eq!(flat, all, "{threads} threads");
            let total: usize = lens.iter().sum();
            for part in &parts {
                let n: usize = part.iter().map(|(_, r)| r.len()).sum();
                assert!(n.abs_diff(total / threads) <= 16, "{threads}: {n}");
                assert!(part.iter().all(|(_, r)| !r.is_empty()));
            }
        }
    }

    #[test]
    fn every_step_moves_every_element_and_stays_normal() {
        for kind in [RoofKind::Roof44, RoofKind::Roof28] {
            let lens = [3000, 17, 5000];
            let mut one = RoofModel::new(kind, &lens, 1).unwrap();
            let mut three = RoofModel::new(kind, &lens, 3).unwrap();
            // Without clipping every pass is elementwise, so the arrays do not depend on the
            // partition: a piece left out or stepped twice would show.
            for _ in 0..10 {
                one.step(false);
                three.step(false);
            }
            for (a, b) in one
                .arrays
                .iter()
                .flatten()
                .zip(three.arrays.iter().flatten())
            {
                assert_eq!(a[..], b[..], "{kind:?}");
            }
            for step in 0..300 {
                assert!(three.step(step % 2 == 1).is_finite());
            }
            let values = three.arrays.iter().flatten().flat_map(|b| b.iter());
            assert_eq!(values.filter(|x| !x.is_normal()).count(), 0, "{kind:?}");
        }
        assert!(RoofModel::new(RoofKind::Roof28, &[10], 0).is_err());
    }
}
