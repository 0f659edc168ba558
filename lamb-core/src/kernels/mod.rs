//! The element-wise math and the reduction order shared by every backend.
//!
//! Bit-exact rule: every backend computes each element with the operations of
//! [`scalar::update`] in the same order, with separate multiplies and adds (never FMA) and
//! IEEE `sqrt` and `/` (never the approximate reciprocals). Sums of squares are exact
//! products in f64 (an f32 × f32 product fits in f64), added into 16 lanes (element `i` of
//! a block goes to lane `i % 16`), the lanes folded by [`fold_lanes`], and blocks of
//! [`BLOCK`] elements added in index order by the caller. f64 lanes (rather than f32 ones)
//! cost nothing measurable in these memory-bound loops and make the norms overflow-free:
//! any finite f32 tensor has a finite f64 sum of squares.

pub(crate) mod arch;
pub(crate) mod compact;
pub(crate) mod scalar;
pub(crate) mod simd;

/// Elements per reduction block. Threads split layers on multiples of this.
pub const BLOCK: usize = 1024;

/// Lanes of the partial sums inside a block.
pub const LANES: usize = 16;

/// Folds 16 lane partials in the fixed tree `l[j] += l[j + w]` for `w = 8, 4, 2, 1`.
#[inline(always)]
pub(crate) fn fold_lanes(mut l: [f64; LANES]) -> f64 {
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            l[j] += l[j + w];
        }
        w /= 2;
    }
    l[0]
}
