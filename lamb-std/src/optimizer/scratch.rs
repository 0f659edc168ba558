//! [`Scratch`]: what a step needs besides the layer states, kept in the optimizer so that
//! a step reuses it (cleared, not reallocated): the plan among threads, the per-block sums,
//! the per-group and per-layer values of one step, and the allocations of the piece lists.
//! After the first step of a model, a step of f32 parameters allocates nothing
//! (`tests/step_allocations.rs` counts).

use lamb_core::{LambConfig, LayerNorms, LayerReport, StepScalars};

use crate::parallel::partition::Piece;
use crate::parallel::run::{Lists, Work};

/// Buffers of the step, owned by the optimizer between steps.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The partition of the layers among the threads; rebuilt at the next step when
    /// `plan_stale` (adding a layer or changing the thread count only marks it, so that
    /// registering n layers is O(n), not O(n²)).
    pub(crate) plan: Vec<Piece>,
    pub(crate) plan_stale: bool,
    /// Phase-1 block sums of all layers, laid end to end (layer `i` at its block offset).
    pub(crate) block_norms: Vec<LayerNorms>,
    /// Gradient block sums of squares, same layout.
    pub(crate) block_grad_sq: Vec<f64>,
    /// Per group: this step's configuration and scalars.
    pub(crate) configs: Vec<LambConfig>,
    pub(crate) scalars: Vec<StepScalars>,
    /// Per layer: norms (phase 1), the plan (trust ratio, step size), Σg².
    pub(crate) norms: Vec<LayerNorms>,
    pub(crate) reports: Vec<LayerReport>,
    pub(crate) grad_sq: Vec<f64>,
    /// The gradients' address ranges, for the aliasing check.
    pub(crate) ranges: Vec<(usize, usize, usize)>,
    /// The allocations of the piece list and of the per-thread lists (never holding a
    /// value between steps: see [`crate::parallel::run::recycle`]).
    pub(crate) work: Vec<Work<'static>>,
    pub(crate) lists: Lists<'static, 'static>,
}

impl Scratch {
    /// Reserves the block sums of a new layer of `blocks` blocks, or says how many bytes
    /// could not be had.
    pub(crate) fn reserve_layer(&mut self, blocks: usize) -> Result<(), Option<usize>> {
        let sums = blocks.checked_mul(size_of::<LayerNorms>() + size_of::<f64>());
        self.block_norms.try_reserve(blocks).map_err(|_| sums)?;
        self.block_grad_sq.try_reserve(blocks).map_err(|_| sums)
    }

    /// Adds the block sums of a new layer (reserved first) and marks the plan stale.
    pub(crate) fn push_layer(&mut self, blocks: usize) {
        self.block_norms
            .resize(self.block_norms.len() + blocks, LayerNorms::default());
        self.block_grad_sq
            .resize(self.block_grad_sq.len() + blocks, 0.0);
        self.plan_stale = true;
    }
}
