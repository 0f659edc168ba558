//! The two phases of a layer, and sums of squares, on one backend: the public methods check
//! the buffers' lengths and the backend, then run the kernels block by block.
//!
//! Phase 1 ([`Backend::norms`]) reads g, m, v and p and sums ‖p‖² and ‖u‖² (the new moments
//! and u are computed in registers, never stored), in blocks of [`BLOCK`] elements added in
//! block order. Phase 2 ([`Backend::apply`]) recomputes the same m, v and u bit for bit and
//! writes m, v and p. Between them, [`LayerReport::plan`](crate::LayerReport::plan) decides
//! the step size or refuses the step.
//!
//! Phase 1 writing nothing costs 16 B read, then 16 B read + 12 B written = 44 B/element.
//! Writing the moments in phase 1 would save a read (40 B/element) but could not refuse a
//! step before writing anything without an extra read of g (44 B again), and would not see
//! what a gradient check cannot: a NaN already in m, v or p, or an update that overflows.
//! So a layer is never half-applied.

use core::hint::black_box;

use super::{Backend, Kernels};
use crate::error::LambError;
use crate::fpenv::DefaultFpMode;
use crate::kernels::BLOCK;
use crate::layer::{CompactLayer, Grads, Moments, Params, check_f32_lengths};
use crate::scalars::{LayerNorms, StepScalars};

/// Phase 1 and phase 2 of layers of f32 buffers.
impl Backend {
    /// Phase 1 over a whole layer: Σp² and Σu², block sums added in block order.
    ///
    /// ```
    /// use lamb_core::{Backend, LambConfig, StepScalars};
    /// let s = StepScalars::new(&LambConfig::paper(), 1, 1.0).unwrap();
    /// let n = Backend::Scalar.norms(&s, &[3.0, 4.0], &[1.0, 1.0], &[0.0; 2], &[0.0; 2]).unwrap();
    /// assert_eq!(n.param_sq, 25.0);
    /// ```
    pub fn norms(
        self,
        scalars: &StepScalars,
        param: &[f32],
        grad: &[f32],
        m: &[f32],
        v: &[f32],
    ) -> Result<LayerNorms, LambError> {
        let _mode = DefaultFpMode::enter();
        check_f32_lengths(param.len(), grad.len(), m.len(), v.len())?;
        self.layer_norms(scalars, F32Buffers { param, grad, m, v })
    }

    /// Phase 1 over a block-aligned chunk of a layer, one [`LayerNorms`] per block of
    /// [`BLOCK`] elements written to `out` (which must hold
    /// `param.len().div_ceil(BLOCK)` entries). Adding `out` in order gives exactly
    /// [`Backend::norms`] of the whole layer, however the layer was cut into chunks,
    /// provided every chunk but the last has a multiple of `BLOCK` elements. A shorter `out`
    /// is [`LambError::OutTooShort`], with nothing written.
    pub fn norms_blocks(
        self,
        scalars: &StepScalars,
        param: &[f32],
        grad: &[f32],
        m: &[f32],
        v: &[f32],
        out: &mut [LayerNorms],
    ) -> Result<(), LambError> {
        let _mode = DefaultFpMode::enter();
        check_f32_lengths(param.len(), grad.len(), m.len(), v.len())?;
        self.norms_per_block(scalars, F32Buffers { param, grad, m, v }, out)
    }

    /// Phase 2: recomputes m, v and u exactly as phase 1 did and writes
    /// `m`, `v` and `p − step_size·u`.
    pub fn apply(
        self,
        scalars: &StepScalars,
        step_size: f32,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> Result<(), LambError> {
        let _mode = DefaultFpMode::enter();
        check_f32_lengths(param.len(), grad.len(), m.len(), v.len())?;
        let k = self.kernels()?;
        // SAFETY: `kernels()` checked that this CPU supports the backend; the lengths are equal.
        unsafe { (k.apply)(scalars, step_size, param, grad, m, v) };
        Ok(())
    }
}

/// Phase 1 and phase 2 of layers in compact storage ([`crate::layer`]).
impl Backend {
    /// Phase 1 of a compact layer: Σp² and Σu², blocks added in order.
    pub fn norms_compact(
        self,
        scalars: &StepScalars,
        layer: &CompactLayer<'_>,
    ) -> Result<LayerNorms, LambError> {
        let _mode = DefaultFpMode::enter();
        if let Some((p, g, m, v)) = all_f32(layer) {
            return self.norms(scalars, p, g, m, v);
        }
        layer.check()?;
        self.layer_norms(scalars, layer)
    }

    /// Phase 1 of a compact layer (or a block-aligned piece of one), one entry per block.
    /// See [`Backend::norms_blocks`].
    pub fn norms_blocks_compact(
        self,
        scalars: &StepScalars,
        layer: &CompactLayer<'_>,
        out: &mut [LayerNorms],
    ) -> Result<(), LambError> {
        let _mode = DefaultFpMode::enter();
        if let Some((p, g, m, v)) = all_f32(layer) {
            return self.norms_blocks(scalars, p, g, m, v, out);
        }
        layer.check()?;
        self.norms_per_block(scalars, layer, out)
    }

    /// Phase 2 of a compact layer. `index0` is the index in the whole layer of this
    /// (piece of a) layer's element 0, used by stochastic rounding; 0 for a whole layer.
    pub fn apply_compact(
        self,
        scalars: &StepScalars,
        step_size: f32,
        layer: &mut CompactLayer<'_>,
        index0: usize,
    ) -> Result<(), LambError> {
        let _mode = DefaultFpMode::enter();
        if let CompactLayer {
            params: Params::F32(p),
            grads: Grads::F32(g),
            moments: Moments::F32 { m, v },
        } = layer
        {
            return self.apply(scalars, step_size, p, g, m, v);
        }
        layer.check()?;
        let k = self.kernels()?;
        // SAFETY: `kernels()` checked CPU support; `check()` checked all lengths.
        unsafe {
            (k.compact_apply)(
                scalars,
                step_size,
                &mut layer.params,
                &layer.grads,
                &mut layer.moments,
                index0,
            )
        };
        Ok(())
    }
}

/// Sums of squares, e.g. for a global gradient norm.
impl Backend {
    /// Σx² with the fixed block/lane order: 16 f32 lanes per block of [`BLOCK`], blocks
    /// added in f64. A block whose sum overflows f32 makes the result infinite.
    ///
    /// ```
    /// assert_eq!(lamb_core::Backend::Scalar.sum_squares(&[3.0, 4.0]), Ok(25.0));
    /// ```
    pub fn sum_squares(self, x: &[f32]) -> Result<f64, LambError> {
        self.sum_squares_grads(&Grads::F32(x))
    }

    /// Σg² of gradients in any storage, with the fixed block/lane order (the same bits as
    /// [`Backend::sum_squares`] of the decoded values).
    ///
    /// ```
    /// use lamb_core::{Backend, layer::Grads};
    /// let g = [half::f16::from_f32(3.0), half::f16::from_f32(4.0)];
    /// assert_eq!(Backend::Scalar.sum_squares_grads(&Grads::F16(&g)), Ok(25.0));
    /// ```
    pub fn sum_squares_grads(self, grads: &Grads<'_>) -> Result<f64, LambError> {
        let _mode = DefaultFpMode::enter();
        let k = self.kernels()?;
        let total = blocks(grads.len()).fold(0.0, |total, (at, len)| {
            // SAFETY: `kernels()` checked that this CPU supports the backend; the block is
            // inside `grads`.
            total
                + unsafe {
                    match grads {
                        Grads::F32(x) => (k.block_sum_squares)(&x[at..at + len]),
                        _ => (k.compact_block_sum_squares)(grads, at, len),
                    }
                }
        });
        Ok(black_box(total))
    }
}

/// What phase 1 reads: four f32 buffers ([`F32Buffers`]) or a layer in compact storage,
/// whose lengths were checked. A trait, not an enum, so that each caller's code holds only
/// its own kind (the f32 step of a firmware image then links no compact-storage kernel).
trait Phase1: Copy {
    /// Elements in the layer.
    fn len(self) -> usize;

    /// Phase 1 of the elements `[at, at + len)`, one block.
    ///
    /// # Safety
    /// `k` must come from [`Backend::kernels`] (the CPU supports it), and the block must lie
    /// inside the buffers.
    unsafe fn block(self, k: &Kernels, s: &StepScalars, at: usize, len: usize) -> LayerNorms;
}

/// Four f32 buffers of equal length.
#[derive(Clone, Copy)]
struct F32Buffers<'a> {
    param: &'a [f32],
    grad: &'a [f32],
    m: &'a [f32],
    v: &'a [f32],
}

impl Phase1 for F32Buffers<'_> {
    #[inline(always)]
    fn len(self) -> usize {
        self.param.len()
    }

    #[inline(always)]
    unsafe fn block(self, k: &Kernels, s: &StepScalars, at: usize, len: usize) -> LayerNorms {
        let r = at..at + len;
        let F32Buffers { param, grad, m, v } = self;
        // SAFETY: forwarded from this function's contract; the sub-slices are the same
        // range of equal-length slices.
        unsafe { (k.block_norms)(s, &param[r.clone()], &grad[r.clone()], &m[r.clone()], &v[r]) }
    }
}

impl Phase1 for &CompactLayer<'_> {
    #[inline(always)]
    fn len(self) -> usize {
        self.params.len()
    }

    #[inline(always)]
    unsafe fn block(self, k: &Kernels, s: &StepScalars, at: usize, len: usize) -> LayerNorms {
        // SAFETY: forwarded from this function's contract.
        unsafe { (k.compact_block_norms)(s, &self.params, &self.grads, &self.moments, at, len) }
    }
}

impl Backend {
    /// Phase 1 of a whole checked layer: the blocks' sums added in block order.
    fn layer_norms(self, s: &StepScalars, layer: impl Phase1) -> Result<LayerNorms, LambError> {
        let k = self.kernels()?;
        let total = blocks(layer.len()).fold(LayerNorms::default(), |total, (at, len)| {
            // SAFETY: `kernels()` checked CPU support; the block is inside the layer.
            total + unsafe { layer.block(&k, s, at, len) }
        });
        Ok(black_box(total))
    }

    /// Phase 1 of a checked layer, block by block into `out`.
    fn norms_per_block(
        self,
        s: &StepScalars,
        layer: impl Phase1,
        out: &mut [LayerNorms],
    ) -> Result<(), LambError> {
        let n = layer.len();
        let needed = n.div_ceil(BLOCK);
        if out.len() < needed {
            return Err(LambError::OutTooShort {
                blocks: needed,
                found: out.len(),
            });
        }
        let k = self.kernels()?;
        for ((at, len), slot) in blocks(n).zip(out) {
            // SAFETY: `kernels()` checked CPU support; the block is inside the layer.
            *slot = unsafe { layer.block(&k, s, at, len) };
        }
        Ok(())
    }
}

/// The blocks `(at, len)` of a layer of `n` elements, in order: [`BLOCK`] elements each but
/// the last.
#[inline]
fn blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(BLOCK).map(move |at| (at, BLOCK.min(n - at)))
}

/// p, g, m, v of an all-f32 layer.
type F32Rows<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// The buffers of an all-f32 compact layer: the f32 kernels serve it directly (the compact
/// path would compute the same bits, a few percent slower).
fn all_f32<'a>(layer: &'a CompactLayer<'_>) -> Option<F32Rows<'a>> {
    match layer {
        CompactLayer {
            params: Params::F32(p),
            grads: Grads::F32(g),
            moments: Moments::F32 { m, v },
        } => Some((p, g, m, v)),
        _ => None,
    }
}
